"""The binaries' front door: their `--help`, a quiet start, and user errors as one line.

Every binary (`jsds-run`, `jsds-encode`, `jsds-train`, `jsds-eval`, `jsds-search`) defines its
flags and then calls `cli.run(main, Command(...))` instead of `absl.app.run(main)`. That gives:

- `--help` / `-h`: what the command does, its own flags with their meaning and defaults, and an
  example (absl's own help lists only flags of the `__main__` module, which for a console script
  is none).
- A mistake the user can make (a config typo such as `--config.train.batchsize=8`, a flag value
  out of range such as `--k 0`, a corrupt image, a malformed JSON, a missing checkpoint) ends
  with one line on stderr, `error: <what, naming the file/field/value>. <what to do>`, and exit
  status 2. `--verbose` adds the traceback.
- No start-up notices that are not about the user's run: JAX's "Unable to initialize backend
  'tpu'" (JAX probes every platform it knows) and transformers' "PyTorch was not found" (we
  never use its PyTorch models); log lines (validation results) are printed above the progress
  bars instead of into them.
"""

from collections.abc import Callable, Sequence
import dataclasses
import logging as std_logging
import os
import re
import sys
import textwrap
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags

EXIT_USER_ERROR = 2
VERBOSE_FLAG = "verbose"
_HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?")
_SKIP_BAD_HINT = "pass --config.data.skip_bad=True to drop bad items and go on"


@dataclasses.dataclass(frozen=True)
class Command:
  """What `--help` says about a binary.

  Attributes:
    name: the console script, e.g. "jsds-search".
    summary: one sentence: what it does.
    usage: the argument pattern after the name, e.g. "--index DIR [flags] QUERY...".
    flag_names: the binary's own flags, in the order to list them.
    examples: whole command lines.
    notes: paragraphs printed after the flags.
  """

  name: str
  summary: str
  usage: str
  flag_names: Sequence[str]
  examples: Sequence[str]
  notes: Sequence[str] = ()


# ----------------------------------------------------------------------------------------------
# Quiet start.


class _DropNotices(std_logging.Filter):
  """Drops log records whose message starts with one of `prefixes`."""

  def __init__(self, prefixes: Sequence[str]):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def quiet_startup() -> None:
  """Silences the two start-up notices that say nothing about the user's run.

  Must run before transformers is imported: it decides whether to print its notice at import.
  """
  # transformers prints "PyTorch was not found..." through `warning_advice`, which this
  # variable turns off; it is only advice about models we never load.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  # JAX logs a failed probe of each platform it knows (TPU on every CPU machine); a real
  # failure on the platform in use still raises.
  std_logging.getLogger("jax._src.xla_bridge").addFilter(
      _DropNotices(("Unable to initialize backend",)))


# ----------------------------------------------------------------------------------------------
# Help.


def _flag_line(name: str) -> str:
  flag = flags.FLAGS[name]
  if isinstance(flag.default, bool) or flag.flag_type() == "bool":
    shown = f"--[no]{name}"
  else:
    shown = f"--{name}"
  meaning = flag.help or ""
  if name == "config":
    default = "required"
  elif flag.default is None:
    default = "required" if _is_required(name) else "none"
  else:
    value = flag.default
    shown_value = value if not isinstance(value, bool) else str(value).lower()
    default = f"default: {shown_value if shown_value != '' else chr(34) * 2}"
  body = textwrap.fill(f"{meaning} ({default})", width=72, subsequent_indent=" " * 22)
  return f"  {shown:<19} {body}" if len(shown) < 20 else f"  {shown}\n{' ' * 22}{body}"


def _is_required(name: str) -> bool:
  # absl keeps required flags as validators; their message names the flag.
  for validator in getattr(flags.FLAGS[name], "validators", []):
    if "must have a value other than None" in getattr(validator, "message", ""):
      return True
  return False


def _config_sections() -> str:
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  return ", ".join(config_base.base_config().keys())


def help_text(command: Command) -> str:
  """The `--help` page of `command` (its flags must be defined)."""
  lines = [f"{command.name}: {command.summary}", "", f"usage: {command.name} {command.usage}",
           "", "flags:"]
  for name in list(command.flag_names) + [VERBOSE_FLAG]:
    lines.append(_flag_line(name))
  if "config" in command.flag_names:
    lines += [
        "  --config.SECTION.FIELD=VALUE",
        textwrap.fill(f"override one field of the config file, e.g. "
                      f"--config.train.batch_size=32; sections: {_config_sections()} (every "
                      "field with its meaning: jsds_jax/config_base.py)", width=72,
                      initial_indent=" " * 22, subsequent_indent=" " * 22)]
  for note in command.notes:
    lines += ["", textwrap.fill(note, width=94)]
  lines += ["", "examples:"] + [f"  {e}" for e in command.examples]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Errors.


def _one_line(text: str) -> str:
  return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _verbose(argv: Sequence[str]) -> bool:
  # Read before parsing, which is what may fail.
  return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for a in argv)


def fail(message: str, hint: str, *, verbose: bool = False) -> NoReturn:
  """Prints `error: <message>. <hint>` (and the current traceback if `verbose`); exits 2."""
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  message = _one_line(message).rstrip(".")
  if not message.endswith(("?", "!")):
    message += "."
  hint = _one_line(hint)
  print(f"error: {message}" + (f" {hint[0].upper()}{hint[1:]}" if hint else ""),
        file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _config_override_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line from ml_collections' override errors (repr'd KeyErrors inside AttributeErrors)."""
  text = str(error.args[0]) if error.args else str(error)
  text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
  overrides = [a for a in argv if a.startswith("--config.")]
  unknown = re.match(r"""^['"]*([^'"]+)['"]*""", text)
  if isinstance(error, (KeyError, AttributeError)) and unknown:
    field = unknown.group(1)
    culprit = next((a for a in overrides if re.search(rf"\.{re.escape(field)}(=|\.|$)", a)),
                   f"--config...{field}")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    return (f"{culprit.split('=')[0]}: the config has no field {field!r}" +
            (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))
  return f"config: {text.strip()}" + (f" (overrides: {' '.join(overrides)})" if overrides else "")


def _parse_flags(command: Command, argv: list[str]) -> list[str]:
  """absl's flag parsing, with --help ours and every parse error one line."""
  if any(a in _HELP_ARGS for a in argv[1:]):
    print(help_text(command))
    sys.exit(0)
  verbose = _verbose(argv)
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      # config_flags defers a failed load to the first use; make it fail here instead.
      hasattr(flags.FLAGS.config, "train")
    return rest
  except flags.Error as e:
    fail(_flag_error_message(e), f"see `{command.name} --help` for the flags", verbose=verbose)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised by ml_collections while applying --config.x.y=... (an unknown or locked field, a
    # value of the wrong type), or by the config file's get_config.
    fail(_config_override_message(e, argv),
         "every config field is listed with its meaning in jsds_jax/config_base.py",
         verbose=verbose)
  except (OSError, SyntaxError, ImportError) as e:  # the config file itself
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1:]
    fail(f"cannot load the config file: {last[0] if last else type(e).__name__}",
         "pass --config PATH of a Python file with get_config(), e.g. configs/demo.py",
         verbose=verbose)


def _flag_error_message(error: flags.Error) -> str:
  text = _one_line(str(error))
  missing = re.search(r"Flag --(\S+) must have a value other than None", text)
  if missing:  # absl's wording for a required flag left out
    return f"the flag --{missing.group(1)} is required"
  return text


def _hint_for(error: BaseException, command: Command) -> str:
  """What to do about `error`, unless its message already says."""
  from jsds_jax.data.split import BadItemError  # pylint: disable=g-import-not-at-top
  text = str(error)
  if isinstance(error, BadItemError):
    return "" if "skip_bad" in text else _SKIP_BAD_HINT
  if isinstance(error, app.UsageError):
    return f"see `{command.name} --help`"
  return "add --verbose to see the traceback"


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exceptions a user's input causes: bad data, config values, paths, checkpoints, the
  demo data's download.

  ValueError is among them because every ValueError this package raises names the offending
  value; a library bug surfacing as one would still print one line, and --verbose shows where.
  """
  from jsds_jax.data.demo_tuxpaint import DemoDataError  # pylint: disable=g-import-not-at-top
  return (app.UsageError, ValueError, FileNotFoundError, NotADirectoryError,
          IsADirectoryError, PermissionError, DemoDataError)


class BarSafeStream:
  """A stream for log lines that leaves tqdm's progress bars intact.

  A log line written straight to stderr lands after the bar's text on the bar's line; through
  `tqdm.write` the bars are cleared, the line printed, and the bars redrawn below it.
  """

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    if text.strip():
      tqdm.tqdm.write(text.rstrip("\n"), file=self.stream)

  def flush(self) -> None:
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def close(self) -> None:
    """Nothing: stderr is not ours to close (absl's handler closes its stream at exit)."""


def _log_around_progress_bars() -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler().python_handler
  if handler.stream is sys.stderr:
    handler.stream = BarSafeStream(sys.stderr)


def _guarded_main(main: Callable[[Sequence[str]], Any], command: Command,
                  argv: Sequence[str]) -> Any:
  _log_around_progress_bars()
  try:
    return main(argv)
  except user_error_types() as e:
    message = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:  # "[Errno 2] ..." reads badly
      message = f"{e.filename}: {e.strerror}"
    fail(message, _hint_for(e, command), verbose=flags.FLAGS[VERBOSE_FLAG].value)


def run(main: Callable[[Sequence[str]], Any], command: Command) -> None:
  """`absl.app.run(main)` with our --help, --verbose, quiet start and one-line errors."""
  quiet_startup()
  if VERBOSE_FLAG not in flags.FLAGS:
    flags.DEFINE_bool(VERBOSE_FLAG, False, "On an error, also print the traceback.")
  app.run(lambda argv: _guarded_main(main, command, argv),
          flags_parser=lambda argv: _parse_flags(command, list(argv)))
