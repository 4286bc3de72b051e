"""The experiment configs: each loads, is locked on the command line, and carries the paper's
hyperparameters (DESIGN.md §3's table). Nothing is downloaded: configs only name checkpoints."""

import importlib.util
import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from jsds_jax import config_base
from jsds_jax import optim

_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
PAPER = ("blip_coco", "blip_flickr", "albef_coco", "albef_flickr")
ALL = PAPER + ("clip_coco", "demo", "corpus", "tiny")

# DESIGN.md §3: | config | lr | w1 | w2 | λ1 | λ2 | η text | η image |
TABLE = {
    "blip_coco": (5e-5, 0.1, 0.1, 0.9, 0.3, 5e-4, 3e-5),
    "blip_flickr": (1e-5, 0.1, 0.2, 0.7, 0.7, 1e-4, 2e-5),
    "albef_coco": (5e-5, 0.2, 0.5, 0.9, 0.3, 1e-5, 3e-5),
    "albef_flickr": (1e-5, 0.1, 0.2, 0.3, 0.3, 1e-4, 2e-5),
}


def _load(name: str, arg=None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
  """The config as the binaries see it (`DEFINE_config_file(..., lock_config=True)`)."""
  argv = ["prog"] + argv
  fv = flags.FlagValues()
  # sys_argv: the overrides are read from it, not from the list the flags are parsed from.
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _leaf_paths(c: ml_collections.ConfigDict, prefix=""):
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaf_paths(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


@pytest.mark.parametrize("name", ALL)
def test_loads_with_the_base_fields_only(name):
  c = _load(name)
  # A config may change values, never add fields the binaries do not declare.
  assert set(_leaf_paths(c)) == set(_leaf_paths(config_base.base_config())), name
  assert c.train.batch_size % 8 == 0


@pytest.mark.parametrize("name", ("blip_coco", "albef_flickr", "clip_coco"))
def test_command_line_overrides_and_typos(name):
  path = str(_CONFIGS / f"{name}.py")
  c = _parse([f"--config={path}", "--config.data.json=/x/dataset.json",
              "--config.train.loss.w1=0.25"])
  assert c.data.json == "/x/dataset.json" and c.train.loss.w1 == 0.25
  with pytest.raises(Exception, match="lr_typo"):
    _parse([f"--config={path}", "--config.train.projections.lr_typo=1e-3"])
  with pytest.raises(AttributeError):
    c.train.new_field = 1  # locked


@pytest.mark.parametrize("name", PAPER)
def test_paper_hyperparameters(name):
  c = _load(name)
  lr, w1, w2, lam1, lam2, eta_t, eta_i = TABLE[name]
  loss = c.train.loss
  assert (loss.w1, loss.w2, loss.lam1, loss.lam2) == (w1, w2, lam1, lam2)
  assert (loss.eta_text, loss.eta_image) == (eta_t, eta_i)
  assert loss.regularizer == "l1" and loss.reg_warmup_fraction == 0.2
  assert not loss.reference_quirks
  # The official JSDS runs train every tail param and τ in ONE AdamW group at the table's lr
  # with weight decay 0.05 (see configs/blip_coco.py).
  for group in (c.train.pretrained, c.train.projections):
    assert (group.lr, group.weight_decay) == (lr, 0.05)
  assert c.train.mode == "jsds" and c.train.freeze == ()
  assert c.train.batch_size == 256
  assert (c.train.b1, c.train.b2, c.train.eps) == (0.9, 0.999, 1e-8)
  assert c.train.warmup_fraction == 0.2 and c.train.clip_norm == 1.0
  assert c.train.num_epochs == 200 * 5  # 200 official (every-caption) epochs
  assert c.data.name == "karpathy"
  if name.endswith("coco"):
    assert c.data.include_restval  # the paper's 113,287 training images
  family = name.split("_")[0]
  assert c.backbone.name == family
  if family == "blip":
    assert c.backbone.checkpoint == f"Salesforce/blip-itm-base-{name.split('_')[1]}"
  else:
    assert c.backbone.checkpoint == ""  # a local LAVIS folder, given on the command line
  # One validation per official epoch, patience 20 of them; no vocab bias, as the official head.
  assert c.train.eval_every_epochs == 5 and c.train.patience == 20
  assert not c.model.use_vocab_bias


def test_clip_coco():
  c = _load("clip_coco")
  assert (c.backbone.name, c.backbone.checkpoint) == ("clip", "openai/clip-vit-base-patch16")
  assert c.train.pretrained.lr == c.train.projections.lr == TABLE["blip_coco"][0]


@pytest.mark.parametrize("name", PAPER + ("clip_coco",))
def test_runlocal_is_small_and_the_optimizer_builds(name):
  c = _load(name, "runlocal")
  assert c.train.batch_size <= 32 and c.train.num_epochs == 1
  scheds = optim.schedules(c.train, total_steps=10)
  assert {g: float(s(2)) for g, s in scheds.items()} == {
      g: pytest.approx(c.train[g].lr) for g in optim.GROUPS}  # peak at step 2 = 20% of 10
  optim.make_optimizer(c.train, total_steps=10)
  with pytest.raises(ValueError, match="runlocal"):
    _load(name, "run_local")


_REPO = _CONFIGS.parent
# Where commands with `--config` are documented: the configs' and binaries' docstrings, the READMEs.
_DOCS = (sorted(_CONFIGS.glob("*.py")) + sorted((_REPO / "jsds_jax").glob("*.py"))
         + [_REPO / "README.md", _REPO / "launch" / "README.md"])


# The README shows what a misspelt field prints: that example must fail, not parse.
_DELIBERATE_TYPOS = {"--config.train.batchsize=8"}


def _documented_commands():
  """(file, config path with its arg or None, [--config.x=y overrides]) per documented command:
  each `--config FILE[:ARG]` with the overrides on its (backslash-continued) line, and each
  override mentioned elsewhere (checked against configs/demo.py)."""
  import re  # pylint: disable=g-import-not-at-top
  out = []
  for path in _DOCS:
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
      # "=..." stands for any value; a trailing "." or ":" ends the sentence, not the value.
      overrides = [o.rstrip(".:")
                   for o in re.findall(r"--config\.[a-z_.]+=[^\s`,;)\"']+", line)
                   if not o.endswith("=...") and o not in _DELIBERATE_TYPOS]
      config = re.search(r"--config[ =](configs/[a-z_]+\.py(?::[a-z_=,0-9]+)?)", line)
      if config or overrides:
        out.append((path.name, config.group(1) if config else None, overrides))
  return out


def test_documented_overrides_parse_against_the_locked_config():
  """Every `--config...` command in the docs parses as the binaries parse it (a typo'd or
  removed field in a docstring fails here)."""
  commands = _documented_commands()
  assert len(commands) > 20 and any(c for _, c, _ in commands if c and ":" in c)
  for where, config, overrides in commands:
    argv = [f"--config={_REPO / (config or 'configs/demo.py')}"]
    argv += overrides
    try:
      _parse(argv)
    except Exception as e:  # pylint: disable=broad-except
      pytest.fail(f"{where}: {config} {overrides}: {e}")


def test_every_config_honours_or_refuses_its_arg():
  for name in ALL:
    with pytest.raises(ValueError, match="unknown config arg 'bogus'"):
      _load(name, "bogus")
  assert _load("blip_coco", "runlocal=true").train.num_epochs == 1
  assert _load("blip_coco", "runlocal=false").train.num_epochs == 200 * 5
  args = config_base.parse_arg("runlocal,epochs=3", runlocal=False, epochs=1, name="x")
  assert (args.runlocal, args.epochs, args.name) == (True, 3, "x")
  with pytest.raises(ValueError, match="not a int"):
    config_base.parse_arg("epochs=three", epochs=1)
def test_corpus_runlocal_is_one_small_source():
  c, small = _load("corpus"), _load("corpus", "runlocal")
  assert (c.data.name, c.data.sources, small.data.sources) == ("corpus", "", "lucide")
  assert small.train.num_epochs < c.train.num_epochs
  with pytest.raises(ValueError, match="takes plain, runlocal"):
    _load("corpus", "run_local")


def test_corpus_has_the_lexical_levers_and_plain_drops_them():
  c, plain = _load("corpus"), _load("corpus", "plain")
  levers = ("train.pretrained.lr", "train.pec", "train.loss.bow_image", "train.loss.bow_text",
            "train.select_max_nnz")
  demo = _load("demo")

  def get(config, dotted):
    for key in dotted.split("."):
      config = config[key]
    return config

  assert [get(c, k) for k in levers] == [get(demo, k) for k in levers]
  base = config_base.base_config()
  assert [get(plain, k) for k in levers] == [get(base, k) for k in levers]
  # The corpus masks WordPiece continuations too (README "Over-used terms"); plain masks
  # special tokens only, as the base config.
  assert (c.model.vocab_mask, demo.model.vocab_mask) == ("special_punct_stop_pieces",
                                                         "special_punct_stop")
  assert plain.model.vocab_mask == base.model.vocab_mask == "special"
  assert _load("corpus", "runlocal,plain").data.sources == "lucide"
