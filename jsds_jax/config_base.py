"""The defaults every experiment config starts from (`configs/*.py` override a few fields).

Every field a binary reads is declared here, so `lock_config=True` turns a typo in
`--config.x.y=...` into an error rather than a silently ignored setting. A config file's
argument (`--config=configs/blip_coco.py:runlocal`) is read by `parse_arg`, big_vision's way.
"""

import ml_collections


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """A config file's argument as fields: "runlocal" or "runlocal,epochs=3" (big_vision's form).

  Args:
    arg: what follows the ':' in `--config=FILE:ARG`; None or "" means every default.
    **spec: the keys the config takes and their defaults; a value is converted to its default's
      type, and a bare key sets a bool default to True.

  Raises:
    ValueError: a key the config does not take, or a value of the wrong type; the message
      names the keys it takes.
  """
  out = ml_collections.ConfigDict(spec)
  takes = ", ".join(sorted(spec)) or "no argument"
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}: this config takes {takes}")
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: use true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config arg {key}={value!r} is not a {type(default).__name__}"
                         ) from None
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The frozen dual encoder (jsds_jax/models/trunk/backbones.py lists the names).
  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = "lit"
  c.backbone.checkpoint = ""      # local directory or Hugging Face id, for blip / clip / albef
  c.backbone.max_text_len = 64
  c.backbone.image_resize = ""    # "" = the backbone's own; squash | shorter_crop | pad
  c.backbone.seed = 0             # tiny only: random init seed

  # Where images and captions come from (jsds_jax/data/registry.py).
  c.data = ml_collections.ConfigDict()
  c.data.name = "demo"            # karpathy | coco_tfds | demo | corpus | synthetic
  c.data.json = ""                # karpathy: the split JSON
  c.data.image_root = ""          # karpathy: the folder image paths are relative to
  c.data.data_dir = ""            # coco_tfds: tfds data_dir ("" = tfds default)
  c.data.cache_dir = "~/.cache/jsds_jax/data"  # demo / corpus / synthetic: where they are built
  c.data.sources = ""             # corpus: train/val sources, "openmoji,mdi" ("" = all)
  c.data.test_sources = ""        # corpus: test sources ("" = data.sources)
  c.data.max_test_images = 0      # corpus: a fixed subset of this many test pictures (0 = all)
  c.data.dataset = ""             # karpathy: name recorded in caches ("" = the file's field)
  c.data.include_restval = True   # karpathy COCO / coco_tfds: "train" takes restval too
  # The Karpathy splits "train" is made of (karpathy / coco_tfds), overriding include_restval
  # when given: ("train", "restval") = COCO's 113,287 images, 443 steps per epoch at batch
  # 256; ("train",) = 82,783 images (the official data module's `split == "train"`), 324
  # steps, so the same epochs are 0.73x the steps. () = as include_restval says.
  c.data.train_splits = ()
  c.data.download = False         # coco_tfds: let tfds download and prepare it
  c.data.num_images = 40          # synthetic: size of the generated set
  c.data.captions_per_image = 2   # synthetic
  c.data.image_size = 64          # synthetic
  c.data.skip_bad = False         # drop unreadable images / empty captions instead of failing
  c.data.splits = ("train", "val", "test")

  # The encode step (jsds_jax/encode.py).
  c.encode = ml_collections.ConfigDict()
  c.encode.cache_root = "~/.cache/jsds_jax/features"
  c.encode.batch_size = 64        # global; a multiple of the local device count
  c.encode.chunk_size = 2048      # items per resumable chunk on disk
  c.encode.dtype = "float32"      # "bfloat16" on accelerators
  c.encode.last_block = False     # also cache the token states entering the last block
  # Also cache the image tower's final token states (bf16, memory-mapped; BLIP-base on COCO
  # test 5k: 577 x 768 x 2 B = 0.9 MB an image): the cross-encoder (ITM) stage reads them.
  c.encode.image_tokens = False
  c.encode.num_workers = 8        # image-decoding threads
  c.encode.shared_cache = False   # several processes, one cache_root they all see: 0 writes

  # Training the tail (jsds_jax/optim.py, jsds_jax/train_step.py, jsds_jax/input_pipeline.py).
  c.train = ml_collections.ConfigDict()
  c.train.mode = "jsds"           # jsds | dense_only | d2s
  c.train.batch_size = 256        # global; a multiple of the device count
  c.train.num_epochs = 200        # an epoch visits every training image once
  c.train.warmup_fraction = 0.2   # lr: linear warm-up over this share of steps, then linear to 0
  c.train.clip_norm = 1.0         # global gradient norm clip, before the groups
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  # Two AdamW groups, named for what they hold. "pretrained": the params whose path matches
  # `params`, the weights taken over from the backbone (the sparse head's word embeddings E,
  # its LayerNorm and vocab bias c, and in the last_block variant the towers' last blocks);
  # "projections": everything else (W_s, the dense projections, tau). These defaults are the
  # official code's two-group optimizer (its D2S
  # branch: LN + E at 5e-5 without decay, the rest at 1e-3). Its JSDS runs train every tail
  # param at the table's lr with decay 0.05 in one group, which the paper configs reproduce by
  # giving both groups those values (configs/blip_coco.py explains).
  c.train.pretrained = ml_collections.ConfigDict()
  c.train.pretrained.params = (r"^(sparse_head/(layer_norm|word_embeddings|vocab_bias)"
                               r"|image_block|text_block)(/|$)")
  c.train.pretrained.lr = 5e-5
  c.train.pretrained.weight_decay = 0.0
  c.train.projections = ml_collections.ConfigDict()
  c.train.projections.lr = 1e-3
  c.train.projections.weight_decay = 0.05  # the official AdamW's default for this group
  # Regexes (re.search over "a/b/c" param paths) of params that never change: no update, no
  # weight decay, no Adam state. d2s adds the dense tails and tau; dense_only the sparse head.
  c.train.freeze = ()
  # Loss weights (DESIGN.md §3); defaults are blip_coco's.
  c.train.loss = ml_collections.ConfigDict()
  c.train.loss.w1 = 0.1
  c.train.loss.w2 = 0.1
  c.train.loss.lam1 = 0.9
  c.train.loss.lam2 = 0.3
  c.train.loss.eta_text = 5e-4
  c.train.loss.eta_image = 3e-5
  c.train.loss.regularizer = "l1"        # l1 | flops
  c.train.loss.reg_warmup_fraction = 0.2  # eta(t) = eta * min(1, t / T)^2, T = this * steps
  c.train.loss.reference_quirks = False  # the official code's KD quirks (ablations only)
  # The official objective's scale: with dense and sparse both on, holi-lab/mm-sparse-retrieval
  # divides L and L' by len(pooling) = 2, total = ½(L/2 + L'/2) + ½R (DESIGN.md §3). False
  # gives DESIGN's ½(L + L') + ½R, where R weighs half as much. The paper configs set True.
  c.train.loss.official_scale = False
  c.train.loss.tau_teacher = 1e-3        # d2s: temperature of the frozen dense teacher
  # Term-level losses that tie the sparse terms to words (jsds / d2s; jsds_jax/term_losses.py),
  # both added to the total with R's factor ½; 0 = off. bow_*: KL(q ‖ softmax(head logits)),
  # q the bag of the caption's content wordpieces (an image: its paired caption's).
  c.train.loss.bow_image = 0.0
  c.train.loss.bow_text = 0.0
  # q weighted by each word's idf over the training captions, log((1+N)/(1+df)), instead of
  # uniform: a caption's rare words take more of the target than its common ones.
  c.train.loss.bow_idf = False
  # df_weight(t) * Σ_v relu(df_v - df_max), df_v = mean over a batch's images (and, apart, its
  # captions) of tanh(z_v / df_scale): penalises terms that fire in more than df_max of a batch;
  # df_weight(t) warms up as eta does (reg_warmup_fraction).
  c.train.loss.df_weight = 0.0
  c.train.loss.df_max = 0.1
  c.train.loss.df_scale = 1.0
  c.train.loss.df_sides = "both"         # the vectors penalised: "both", "image" or "text"
  # Each term's df_max raised by the share of the batch's captions that hold it (content words
  # only): a term fires as often as the captions say it without penalty, the excess is hit.
  c.train.loss.df_natural = False
  # PEC, probabilistic expansion control (jsds / d2s; DESIGN.md §3): with probability p(t), one
  # draw per step, every caption's sparse vector is masked to its own tokens' vocabulary
  # entries; p falls linearly from 1 at step 0 to 0 at `pec_fraction` of the steps. Needs the
  # cache's caption token ids (`encode` writes them, and adds them to an older cache).
  c.train.pec = False
  c.train.pec_fraction = 0.95
  # With pec: on the steps PEC masks the captions, each image is masked to its own caption's
  # tokens too (a STAIR-like grounding phase for the image side, released as p(t) reaches 0).
  c.train.pec_images = False
  # The loop (jsds_jax/train.py) and its checkpoints (jsds_jax/checkpoint.py).
  c.train.features = ""           # a dataset's cache folder (<root>/<backbone>-<key>/<dataset>)
                                  # to train from as it is; "" = encode this config's (or reuse)
  # How the train features sit on the devices (jsds_jax/input_pipeline.py): "replicated" (whole
  # cache on every device), "sharded" (one shard per device; each process reads only its rows;
  # the batches depend on the device count), "auto" = replicated for one process, sharded for
  # several. A resumed run must keep the same layout (and, sharded, the same device count).
  c.train.features_layout = "auto"
  # The train features' dtype on the devices: "" keeps the cache's (float32, or bfloat16 after
  # encode.dtype=bfloat16); "bfloat16" halves their memory (COCO train at 768-d: 2.1 -> 1.05 GB)
  # and the tail's first matmul reads them in its own dtype (model.dtype).
  c.train.features_dtype = ""
  c.train.init_from = ""          # start from another run's params (a workdir or step dir;
                                  # e.g. d2s from a dense_only run); a resumed run ignores it
  # The paper's protocol for backbones without pretrained projections (jsds_jax/protocol.py):
  # the main job (jsds_jax.main) first trains dense_only in <workdir>/dense_stage, then runs
  # jsds / d2s from its best checkpoint. Ignored with init_from, and by the train binary.
  c.train.dense_first = False
  c.train.dense_first_epochs = 0  # the dense stage's epochs; 0 = train.num_epochs
  c.train.val_split = "val"       # validated on, for the best checkpoint and early stopping
  c.train.log_every = 50          # steps between train-metric records (JSONL + TensorBoard)
  c.train.eval_every_epochs = 1   # validate every this many epochs (and after the last step)
  c.train.patience = 20           # stop after this many validations without a better score
                                  # (sparse R@1 t2i; dense in dense_only); 0 = never
  # Checkpoint choice within a sparsity budget: a validation can only become the best one when
  # its mean non-zeros per image and per caption are both <= this (0 = no budget).
  c.train.select_max_nnz = 0.0
  c.train.checkpoint_every = 1000  # steps between checkpoints (also at the end and on SIGTERM)
  c.train.checkpoint_every_seconds = 600  # also once this long after the last (0: off; 1 process)
  c.train.keep_checkpoints = 3    # regular checkpoints kept; the best one is kept apart
  c.train.progress = True         # tqdm progress bar

  # The trained tail's shape (jsds_jax/models/tail/jsds.py); the rest comes from the feature cache.
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 0           # P; 0 = the backbone projection's width, 256 without one
  c.model.use_vocab_bias = True   # the sparse head's (V,) bias c
  c.model.dtype = "float32"       # computation dtype ("bfloat16" on accelerators)
  # The "last_block" variant (jsds_jax/models/tail/last_block.py): "" off, or "image", "text",
  # "both": that side trains a copy of its tower's last transformer block on cached token
  # states (needs encode.last_block=True; the states stream from the host each step).
  c.model.last_block = ""

  # The CMC reranker (DESIGN.md §4; jsds_jax/models/tail/cmc.py, jsds_jax/train_cmc.py).
  c.cmc = ml_collections.ConfigDict()
  c.cmc.in_main_job = False       # jsds-run trains a CMC on the tail (workdir/cmc), evals + CMC
  c.cmc.init_from = ""            # the trained tail's workdir (or step dir) CMC reranks for
  c.cmc.checkpoint = ""           # eval / search --rerank cmc: the CMC run's workdir
  c.cmc.inputs = "dense"          # dense (the tail's e) | pre_projection (cached h, same width)
  c.cmc.input_scale = "none"      # none (official) | tau: inputs x τ^-1/2, so fresh CMC = cos/τ
  c.cmc.first_stage = "integrated"  # mines the candidates and teaches: sparse|dense|integrated
  c.cmc.directions = ("t2i", "i2t")  # trained together in one CMC
  c.cmc.num_candidates = 64       # C per training query: gold + top C/2-1 + C/2 random
  c.cmc.max_rank = 1024           # the random half comes from first-stage ranks [C/2, this)
  c.cmc.candidates_root = "~/.cache/jsds_jax/cmc_candidates"
  c.cmc.num_layers = 2
  c.cmc.num_heads = 4
  c.cmc.mlp_dim = 2048
  c.cmc.dropout = 0.1
  c.cmc.gate = "learned"          # learned (g from gate_init) | fixed (g = gate_init)
  c.cmc.gate_init = -5.0          # the paper's learned start; the official README fixes 0
  c.cmc.alpha = 0.2               # CE weight; 1 - alpha on KL(teacher || CMC)
  c.cmc.teacher = "first_stage"   # first_stage | itm (the ITM logits over the mined pairs, once;
                                  # needs encode.image_tokens=True, a blip or albef backbone)
  c.cmc.temperature = 1.0
  # The teacher's scores are divided by this before the KL. The integrated score (w1·cos +
  # w2·sparse, w = 0.1) spans ~0.5 over a query's 64 candidates, so at 1 the teacher is
  # uniform and the KL teaches CMC to flatten its scores (README "CMC reranker").
  c.cmc.teacher_temperature = 1.0
  c.cmc.multi_positive = "lse"    # several golds (i2t): lse | uniform (losses.info_nce)
  c.cmc.batch_size = 32           # queries per step, global
  c.cmc.num_epochs = 20
  c.cmc.lr = 1e-4
  c.cmc.gate_lr = 0.0             # the gate logits' own peak lr (0 = cmc.lr)
  c.cmc.weight_decay = 0.01
  c.cmc.warmup_fraction = 0.1
  c.cmc.clip_norm = 1.0
  c.cmc.val_split = "val"
  c.cmc.val_k = 64                # validation reranks the first stage's top val_k
  c.cmc.eval_every_epochs = 1
  c.cmc.patience = 5              # validations without a better reranked R@1 (0 = never stop)
  c.cmc.checkpoint_every = 200
  c.cmc.keep_checkpoints = 2
  c.cmc.rerank_ks = (16, 64, 256, 1024)  # eval --rerank cmc
  c.cmc.pipeline_k = 256          # eval --rerank cmc,itm: CMC's K; ITM rescores its top --rerank_k
  c.cmc.attention_block = 128     # eval: attend in query blocks of this size (0 = never); 128 keeps
                                  # the (heads, 128, K) logits in a CPU's cache (bench/README)
  # Terms the sparse head may never weight (jsds_jax/vocab_mask.py): "none", "special" (special
  # tokens and [unused*], standard in learned sparse retrieval), "special_punct" (+ punctuation),
  # "special_punct_stop" (+ English stopwords), "special_punct_stop_pieces" (+ WordPiece
  # continuation pieces such as `##s`: every term starts a word).
  c.model.vocab_mask = "special"
  # Captions' sparse vectors restricted to their own tokens, at train and eval time (and for
  # search queries): no expansion, as an "inference-free" query encoder in learned sparse
  # retrieval; a content word a caption weights is then always one of its own (jsds / d2s).
  c.model.own_caption_terms = False

  # Evaluation (validation during training and the eval binary).
  c.eval = ml_collections.ConfigDict()
  # The integrated score: "cosine" = w1·cos + w2·z·z, the official eval's (no τ); "tau" =
  # w1·cos/τ + w2·z·z, the score the training loss uses (τ ≈ 0.01–0.07 gives dense 14–100× the
  # weight it has in the official eval).
  c.eval.integrated = "cosine"
  return c


# The paper's recipe (DESIGN.md §3; configs/blip_coco.py explains each choice).
PAPER_OFFICIAL_EPOCHS = 200
PAPER_CAPTIONS_PER_IMAGE = 5  # COCO and Flickr30k Karpathy train: 5 captions per image
PAPER_PATIENCE = 20           # validations (official epochs) without a better sparse R@1


def lexical_levers(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets, in place, the levers that make the sparse vectors lexical and sparse (issue 16;
  README "Lexical levers"), as configs/demo.py and configs/corpus.py use them; returns `c`.

  No weight on special tokens, punctuation or stopwords; E trained at 1e-3 (at 5e-5 it barely
  moves in a few hundred steps); PEC on the captions; a bag-of-words target on both sides
  (weight 0.2), which makes the top terms the captions' words; and the best checkpoint chosen
  among validations within <= 60 non-zeros per caption and image (by R@1 alone a run can keep
  an early, dense step, before the target and the regulariser have acted).
  """
  c.model.vocab_mask = "special_punct_stop"
  c.train.pretrained.lr = 1e-3
  c.train.pec = True
  c.train.loss.bow_image = 0.2
  c.train.loss.bow_text = 0.2
  c.train.select_max_nnz = 60.0
  return c


def paper_config(arg, *, backbone: str, checkpoint: str, max_text_len: int,
                 include_restval: bool, lr: float, **loss) -> ml_collections.ConfigDict:
  """A paper run: `base_config` with the official training recipe and one table row.

  Args:
    arg: the config file's argument (`parse_arg`): "" / None (the paper run) or "runlocal"
      (a smoke test: batch 32, one epoch).
    backbone, checkpoint, max_text_len: the frozen dual encoder.
    include_restval: whether Karpathy "train" takes restval too (COCO).
    lr: the table's lr column: the official JSDS runs train every tail param and τ in ONE
      AdamW group at this lr with weight decay 0.05, so both of our groups get it.
    **loss: the row's w1, w2, lam1, lam2, eta_text, eta_image.
  """
  args = parse_arg(arg, runlocal=False)
  c = base_config()
  c.backbone.name = backbone
  c.backbone.checkpoint = checkpoint
  c.backbone.max_text_len = max_text_len
  c.data.name = "karpathy"
  c.data.include_restval = include_restval
  c.data.train_splits = ("train", "restval") if include_restval else ("train",)
  c.encode.batch_size = 256

  c.train.mode = "jsds"
  c.train.batch_size = 256
  # Our epoch visits every image once, the official one every caption: the same step count.
  c.train.num_epochs = PAPER_OFFICIAL_EPOCHS * PAPER_CAPTIONS_PER_IMAGE
  c.train.warmup_fraction = 0.2
  c.train.clip_norm = 1.0
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
  for group in (c.train.pretrained, c.train.projections):
    group.lr = lr
    group.weight_decay = 0.05
  c.train.loss.update(regularizer="l1", reg_warmup_fraction=0.2, official_scale=True, **loss)
  # Validate once per official epoch's worth of steps, so patience counts the same rounds.
  c.train.eval_every_epochs = PAPER_CAPTIONS_PER_IMAGE
  c.train.patience = PAPER_PATIENCE
  c.model.use_vocab_bias = False  # the official vocab projector is `nn.Linear(..., bias=False)`

  if args.runlocal:
    c.train.batch_size = 32
    c.train.num_epochs = 1
    c.train.eval_every_epochs = 1
    c.encode.batch_size = 8
    c.encode.num_workers = 2
  return c
