"""A few train steps over every device of every process, with Orbax checkpoints (a test driver).

tests/test_multiprocess.py runs it as real processes. One process of a multi-process run (the
distributed contract comes from the JSDS_* environment, `jsds_jax.distributed`):

  JSDS_COORDINATOR_ADDRESS=127.0.0.1:PORT JSDS_NUM_PROCESSES=2 JSDS_PROCESS_ID=0 \
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python tests/multiprocess_driver.py train --cache CACHE --workdir RUN --stop_at 3

trains the tail with the "sharded" feature layout (each process reads only its devices' rows of
the cache), saves a checkpoint collectively after every step, resumes from the latest one when
RUN holds any, and process 0 writes the params it ends with to RUN/params.npz. The reference:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/multiprocess_driver.py reference --cache CACHE --out REF.npz

trains one process on 4 devices with the "replicated" layout, fed the same global batches (the
sharded order mapped back to global caption rows), and saves the params after every step; with
`--restore RUN` it also restores RUN's latest checkpoint onto its devices and saves that.

Until jsds_jax/train.py takes over this job, this file is the training loop of those tests.
"""

import argparse
import json
import os
import pathlib
import sys
import time

from jsds_jax import distributed

# Tiny model and data: what matters is the sharding, not the size.
BATCH, TOTAL_STEPS, SEED = 8, 6, 0
EMBED, VOCAB, WORD = 16, 512, 24
# XLA's expensive CPU passes off: these graphs are tiny, compiling dominates the run time.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=("train", "reference"))
  p.add_argument("--cache", required=True)
  p.add_argument("--workdir", help="train: run folder (checkpoints, params.npz)")
  p.add_argument("--stop_at", type=int, default=TOTAL_STEPS, help="train: last step to reach")
  p.add_argument("--step_sleep", type=float, default=0.0, help="train: seconds after a step")
  p.add_argument("--out", help="reference: .npz of the params after each step")
  p.add_argument("--restore", help="reference: a train run folder to restore")
  p.add_argument("--wait_for", help="reference: before restoring, wait for this file to exist "
                 "(the train run's params.npz), so both can start together")
  return p.parse_args(argv)


def _train_config():
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  train = config_base.base_config().train
  train.batch_size = BATCH
  train.warmup_fraction = 0.0  # every step moves the params
  train.loss.eta_text = 1e-2   # a regulariser large enough to matter in a few steps
  train.loss.eta_image = 1e-2
  train.loss.reg_warmup_fraction = 0.0
  return train


def _setup(mesh, image_dim, text_dim):
  """The module, optimizer, step-0 state (replicated over `mesh`) and train config."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import optim  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_step  # pylint: disable=g-import-not-at-top
  from jsds_jax.models import jsds  # pylint: disable=g-import-not-at-top
  train = _train_config()
  module = jsds.JSDSTail(embed_dim=EMBED, vocab_size=VOCAB, word_dim=WORD)
  # Every process computes the same init on its own first device; host copies then go to the
  # global mesh (each process fills its own devices).
  init = jax.jit(module.init, compiler_options=FAST)
  params = init(jax.random.key(1), jnp.zeros((1, image_dim)), jnp.zeros((1, text_dim)))["params"]
  params = jax.tree.map(np.asarray, params)
  tx = optim.make_optimizer(train, total_steps=TOTAL_STEPS)
  state = train_step.create_train_state(params, tx, jax.random.key(2), mesh)
  return module, tx, state, train


def _make_step(module, tx, train, mesh, features):
  """`train_step.make_train_step`; it takes the features' in_spec from their layout."""
  del features
  from jsds_jax import train_step  # pylint: disable=g-import-not-at-top
  return train_step.make_train_step(module, tx, train, TOTAL_STEPS, mesh, compiler_options=FAST)


def _checkpointer(directory):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Synchronous saves: the test kills a process right after a step it knows is on disk.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute() / "ckpt", options=options)


def _to_saveable(state):
  import jax  # pylint: disable=g-import-not-at-top
  return state.replace(rng=jax.random.key_data(state.rng))


def _abstract(state):
  """The restore target: `state`'s shapes, dtypes and shardings (read before it is donated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(state))


def _restore(manager, target):
  """Restores the latest checkpoint into `target`'s (`_abstract`) shapes and shardings."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  step = manager.latest_step()
  got = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  restored = got["state"].replace(rng=jax.random.wrap_key_data(got["state"].rng))
  return restored, input_pipeline.DataPosition.from_dict(got["data"])


def _host_params(params):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import optim  # pylint: disable=g-import-not-at-top
  # Replicated arrays: any local shard is the whole value, on every process.
  return {optim.param_path(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def train(args):
  distributed.maybe_initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from jsds_jax import sharding  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  main = distributed.is_main_process()
  mesh = sharding.global_data_mesh()
  features, layout = input_pipeline.load_sharded_features(args.cache, mesh)
  cap_img = feature_cache.load_split(args.cache)["caption_image_index"]
  module, tx, state, train_cfg = _setup(mesh, features.image_pooled.shape[1],
                                        features.text_pooled.shape[1])
  step_fn = _make_step(module, tx, train_cfg, mesh, features)
  steps_in_epoch = layout.steps_per_epoch(BATCH)
  manager = _checkpointer(args.workdir)
  resumed_from = manager.latest_step()
  position = input_pipeline.DataPosition()
  if resumed_from is not None:
    state, position = _restore(manager, _abstract(state))
    if main:
      print(f"resumed from step {resumed_from} at {position}", flush=True)
  epoch, order = None, None
  while int(state.step) < args.stop_at:
    if position.epoch != epoch:
      epoch = position.epoch
      order = input_pipeline.device_order(
          input_pipeline.epoch_order(SEED, epoch, cap_img, BATCH, layout=layout), mesh)
    state, metrics = step_fn(state, features, order, position.step_in_epoch)
    position = position.next(steps_in_epoch)
    step = int(state.step)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)),
        data=ocp.args.JsonSave(position.to_dict())))
    if main:
      print(f"step {step} loss {float(metrics['loss'].addressable_data(0)):.6f} saved",
            flush=True)
    time.sleep(args.step_sleep)
  manager.wait_until_finished()
  if main:
    # Written to a temporary name and renamed: a reference waiting for it reads it whole.
    tmp = pathlib.Path(args.workdir) / "params.tmp.npz"
    np.savez(tmp, **_host_params(state.params))
    os.replace(tmp, pathlib.Path(args.workdir) / "params.npz")
    (pathlib.Path(args.workdir) / "result.json").write_text(json.dumps(
        {"resumed_from": resumed_from, "step": int(state.step),
         "process_count": jax.process_count(), "devices": len(jax.devices()),
         "features_per_device": features.image_pooled.addressable_shards[0].data.shape[0],
         "images": int(layout.num_images.sum())}))


def reference(args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from jsds_jax import sharding  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 1
  mesh = sharding.global_data_mesh()
  split = feature_cache.load_split(args.cache)
  cap_img = split["caption_image_index"]
  features = input_pipeline.load_device_features(args.cache, mesh)
  module, tx, state, train_cfg = _setup(mesh, features.image_pooled.shape[1],
                                        features.text_pooled.shape[1])
  target = _abstract(state)
  step_fn = _make_step(module, tx, train_cfg, mesh, features)
  # The multi-process run's global batches, as global caption rows.
  layout = input_pipeline.shard_layout(cap_img, mesh.shape[input_pipeline.DATA_AXIS])
  position, epoch, order, out = input_pipeline.DataPosition(), None, None, {}
  for k in range(TOTAL_STEPS):
    if position.epoch != epoch:
      epoch = position.epoch
      order = input_pipeline.device_order(layout.global_captions(
          input_pipeline.epoch_order(SEED, epoch, cap_img, BATCH, layout=layout)), mesh)
    state, _ = step_fn(state, features, order, position.step_in_epoch)
    position = position.next(layout.steps_per_epoch(BATCH))
    out.update({f"step{k + 1}/{p}": v for p, v in _host_params(state.params).items()})
  if args.restore:
    deadline = time.monotonic() + 300
    while args.wait_for and not os.path.exists(args.wait_for):
      if time.monotonic() > deadline:
        raise TimeoutError(f"{args.wait_for} did not appear")
      time.sleep(0.2)
    manager = _checkpointer(args.restore)
    restored, position = _restore(manager, target)
    out.update({f"restored/{p}": v for p, v in _host_params(restored.params).items()})
    out["restored_step"] = np.asarray(int(restored.step))
    out["restored_position"] = np.asarray([position.epoch, position.step_in_epoch])
  np.savez(args.out, **out)


def main(argv):
  args = _parse(argv)
  {"train": train, "reference": reference}[args.mode](args)


if __name__ == "__main__":
  main(sys.argv[1:])
