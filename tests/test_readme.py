"""The README's Python example runs as written (so it cannot rot) and trains: one step lowers
the loss on its batch."""

import pathlib
import re

import numpy as np

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
  text = _README.read_text()
  section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1, f"README section {title!r} should hold one python block"
  return blocks[0]


def test_use_the_modules_in_your_own_model():
  scope = {}
  exec(compile(_section_code("Use the modules in your own model"), str(_README), "exec"), scope)  # pylint: disable=exec-used
  out, params = scope["out"], scope["params"]
  b, p, v = scope["B"], scope["P"], scope["V"]
  assert out["e_i"].shape == (b, p) and out["z_t"].shape == (b, v)
  assert np.isfinite(float(scope["loss"]))
  # The step moved the params and lowered the loss on this batch.
  after = float(scope["loss_fn"](params, 0))
  assert after < float(scope["loss"])
  rebuilt = scope["jsds"].JSDSTail.from_params(params)
  assert (rebuilt.embed_dim, rebuilt.vocab_size, rebuilt.word_dim) == (p, v, scope["D_W"])


def test_public_names_come_from_one_place_with_shapes_in_their_docstrings():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jsds_jax  # pylint: disable=g-import-not-at-top
  assert jsds_jax.__all__ and set(jsds_jax.__all__) <= set(dir(jsds_jax))
  for name in jsds_jax.__all__:
    obj = getattr(jsds_jax, name)
    assert obj.__doc__ and obj.__doc__.strip(), name
    assert obj.__module__.startswith("jsds_jax."), (name, obj.__module__)
  assert jsds_jax.JSDSTail is __import__("jsds_jax.models.tail.jsds", fromlist=["x"]).JSDSTail
  for name in ("JSDSTail", "dense_scores", "sparse_scores", "jsds_loss", "CMC"):
    assert "(" in getattr(jsds_jax, name).__doc__, f"{name}: no shapes in its docstring"
  # `import jsds_jax` alone imports no jax (the binaries' front door runs first).
  out = subprocess.run([sys.executable, "-c", "import sys, jsds_jax; print('jax' in sys.modules)"],
                       capture_output=True, text=True, check=True, cwd=_README.parent)
  assert out.stdout.strip() == "False"
