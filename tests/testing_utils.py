"""Helpers several test files share: the tiny config, environments for JAX subprocesses, and a
hand-made feature cache."""

import importlib.util
import os
import pathlib
import socket
import time

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]

# LLVM's optimisation level 0 for every JAX process of the suite (pytest's and its
# subprocesses'): the tiny models' many programs compile ~3x faster, and their run time is
# negligible. Numerics are XLA's own (the HLO passes, fusion included, are the same). The README
# main job (test_readme_search.py) runs with a user's default flags.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's JAX process on `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"


def load_config(name: str, arg=None) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s get_config(arg), loaded by path as config_flags does."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def log_tail(path: pathlib.Path) -> str:
  """A subprocess log's last lines, for assertion messages."""
  return f"{path}:\n{path.read_text()[-3000:] if path.exists() else '(none)'}"


def wait_all(procs, logs, timeout: float) -> None:
  """Waits for every process; kills what is left at the deadline; asserts exit status 0,
  showing the failing process's log."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log_tail(pathlib.Path(log))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def jax_subprocess_env(devices: int, jax_cache: pathlib.Path, **extra) -> dict[str, str]:
  """A clean environment for a JAX subprocess on `devices` fake CPU devices.

  Inherited JSDS_/SLURM_/JAX_ settings are dropped so the run's own contract is all it sees; a
  persistent compilation cache shared by the subprocesses of a test skips repeated compiles.
  """
  # The run's shared compilation cache (conftest.py), else the test's own.
  jax_cache = os.environ.get("JSDS_TEST_JIT_CACHE", jax_cache)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JSDS_", "SLURM_", "XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
             PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  return env


def write_split(directory, image, text, caption_image_index):
  """A finished feature cache, as `encode` writes it (see data/feature_cache.py)."""
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  directory.mkdir(parents=True)
  arrays = {"image_pooled": image, "text_pooled": text,
            "caption_image_index": caption_image_index}
  for name, array in arrays.items():
    feature_cache.atomic_save_npy(directory / f"{name}.npy", array)
  feature_cache.atomic_write_json(directory / feature_cache.ITEMS, {
      "image_ids": list(range(len(image))), "image_sources": [""] * len(image),
      "captions": [f"caption {i}" for i in range(len(text))]})
  feature_cache.atomic_write_json(directory / feature_cache.META, {
      "backbone": "fake", "weights_hash": "f" * 64, "dataset": "fake",
      "split": directory.name, "num_images": len(image), "num_captions": len(text),
      "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}})


def save_random_cmc(workdir, tail_params, dim: int, seed: int = 1, **module_kw):
  """A random CMC (open gates, so it really reorders) saved as `train_cmc` saves one, for the
  tail `tail_params` with `dim`-wide dense embeddings. Returns (module, params)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from jsds_jax import cmc_candidates  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.tail import cmc as cmc_lib  # pylint: disable=g-import-not-at-top
  kw = dict(num_layers=1, num_heads=4, mlp_dim=32, gate_init=0.0, **module_kw)
  module = cmc_lib.CMC(**kw)
  params = jax.tree_util.tree_map(np.asarray, cmc_lib.init_cmc(jax.random.key(seed), module,
                                                               dim))
  meta = {"mode": "cmc", "tail_hash": cmc_candidates.tail_hash(tail_params),
          "num_heads": kw["num_heads"], "gate": "learned", "gate_init": kw["gate_init"],
          "inputs": "dense", "input_scale": float(kw.get("input_scale", 1.0))}
  ckpt = checkpoint.Checkpointer(workdir, 0, 1, async_save=False)
  ckpt.save_best(1, params, meta, checkpoint.Progress(), 0.0)
  ckpt.close()
  return module, params


def run_train_steps(data, module, params, tc, n_devices: int, steps: int, batch_size: int,
                    compiler_options=None, **step_kwargs):
  """`steps` sharded train steps of `tc` on hand-made data (dict image, text, cap_img, ids)
  over the first `n_devices` devices, from a copy of `params`, on epoch 0's order.

  Returns (final state, per-step metrics as numpy, the (steps, B) epoch order).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from jsds_jax import optim  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_step  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n_devices]), ("data",))
  tx = optim.make_optimizer(tc, total_steps=steps)
  features = input_pipeline.device_features(data["image"], data["text"], data["cap_img"], mesh,
                                            text_token_ids=data["ids"])
  order = input_pipeline.epoch_order(0, 0, data["cap_img"], batch_size)
  state = train_step.create_train_state(jax.tree_util.tree_map(jnp.copy, params), tx,
                                        jax.random.key(2), mesh)
  step = train_step.make_train_step(module, tx, tc, steps, mesh,
                                    compiler_options=compiler_options, **step_kwargs)
  dev_order = input_pipeline.device_order(order, mesh)
  history = []
  for k in range(steps):
    state, metrics = step(state, features, dev_order, k)
    history.append(jax.tree_util.tree_map(np.asarray, metrics))
  return state, history, order


def write_fake_features(root: pathlib.Path, images: dict[str, int], *, d_img: int, d_txt: int,
                        embed: int, vocab: int, word_dim: int, seed: int = 0) -> pathlib.Path:
  """A finished feature-cache folder made directly (no backbone to load): for each split in
  `images` ({split: number of images}) 2 captions per image that are noisy linear images of their
  pictures' features (so retrieval is learnable), and tail_init.safetensors beside the splits
  (a `vocab` x `word_dim` embedding, random `embed`-d projections). Returns `root`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d_img, d_txt)).astype(np.float32)
  for split, n_img in images.items():
    image = rng.normal(size=(n_img, d_img)).astype(np.float32)
    cap_img = np.repeat(np.arange(n_img), 2)
    text = image[cap_img] @ mix + 0.5 * rng.normal(size=(2 * n_img, d_txt)).astype(np.float32)
    write_split(root / split, image, text, cap_img)
  proj = lambda d: rng.normal(size=(d, embed)).astype(np.float32) / np.sqrt(d)
  feature_cache.save_tail_init(root.parent / feature_cache.TAIL_INIT, {
      "word_embeddings": rng.normal(size=(vocab, word_dim)).astype(np.float32) * 0.1,
      "image_proj.kernel": proj(d_img), "image_proj.bias": np.zeros(embed, np.float32),
      "text_proj.kernel": proj(d_txt), "text_proj.bias": np.zeros(embed, np.float32)})
  return root


def np_log_softmax(s):
  """Row-wise log-softmax in NumPy (float64 references for the losses)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  m = s.max(axis=1, keepdims=True)
  return s - m - np.log(np.exp(s - m).sum(axis=1, keepdims=True))


def save_tiny_hf_blip(path: pathlib.Path):
  """A random tiny Hugging Face `BlipForImageTextRetrieval` (eval mode), saved at `path`.

  Vision width 24, text width 32 (so the ITM cross-attention's key/value shapes are checked),
  2 layers each, 32 px images in 8 px patches, a 100-token vocabulary. The vision class and
  position embeddings and the ITM head are redrawn at a larger scale (Hugging Face initialises
  them near 0), so that a wrong input shows in the outputs.

  Returns: the torch model.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.BlipConfig(
      vision_config=dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4),
      text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                       bos_token_id=98, pad_token_id=0, sep_token_id=3, eos_token_id=2),
      image_text_hidden_size=16)
  torch.manual_seed(0)
  model = transformers.BlipForImageTextRetrieval(config).eval()
  with torch.no_grad():
    emb = model.vision_model.embeddings
    emb.class_embedding.normal_(0, 0.5)
    emb.position_embedding.normal_(0, 0.5)
    model.itm_head.weight.normal_(0, 1.0)
    model.itm_head.bias.normal_(0, 1.0)
  model.save_pretrained(path)
  return model


def blip_batch(rng, lengths=(7, 5, 3, 2), seq_len: int = 7, image_size: int = 32):
  """Random inputs for `save_tiny_hf_blip`'s model, one row per entry of `lengths`.

  Returns: pixels (B, image_size, image_size, 3) float32; ids and mask (B, seq_len) int32, row i
  holding lengths[i] tokens, the first a [CLS]-like 1, then zeros (padding).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  pixels = rng.normal(size=(len(lengths), image_size, image_size, 3)).astype(np.float32)
  ids = np.zeros((len(lengths), seq_len), np.int32)
  mask = np.zeros((len(lengths), seq_len), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(4, 98, n)
    ids[i, 0] = 1
    mask[i, :n] = 1
  return pixels, ids, mask
