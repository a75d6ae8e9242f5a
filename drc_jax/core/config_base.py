"""The shared base of every config in ``configs/``: one field per line, each with its meaning.

Dataset configs call ``base_config()`` and change what differs; ``parse_arg`` reads the variant
string after the colon (``--config=configs/cifar10.py:runlocal,res=64``).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import os
import sys
import textwrap
import tokenize

import ml_collections

from drc_jax.core import errors, protocol


def configs_dir() -> str:
  """The directory of the dataset configs: the repository's ``configs/``, which a wheel ships as
  the package ``drc_jax.configs`` (pyproject maps that package onto the folder, so there is one
  copy). From a checkout run without installing, the folder beside the package."""
  spec = importlib.util.find_spec('drc_jax.configs')
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'configs')


# The embedded default job (python -m drc_jax.main, drc-audit, analysis bench without --config).
DEFAULT_CONFIG = os.path.join(configs_dir(), 'fashion_mnist.py')


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all datasets (the paper's DDPM protocol where one exists)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: model init, training noise, attack noise (each stream folded in)
  c.mode = 'all'  # default --mode: train, audit, report, dataset or all (train if needed, audit)
  c.smoke_run = False  # a runlocal shrink: the report says its figures mean nothing

  c.data = ml_collections.ConfigDict()
  c.data.source = 'fashion_mnist'  # 'fashion_mnist' (Debian IDX files), 'tfds' or 'folder'
  c.data.name = 'fashion_mnist'  # dataset name (the tfds builder name when source = 'tfds')
  c.data.split = 'train'  # split of the dataset that member and non-member indices point into
  c.data.data_dir = ''  # IDX dir / tfds data_dir / image folder ('' = the source's default)
  c.data.resolution = 32  # model resolution: images are (cropped and) resized to this
  c.data.channels = 3  # model channels: 1 (grayscale) or 3 (RGB)
  c.data.center_crop = 0  # centre crop to this size before resizing (0 = none; 140 for CelebA)
  c.data.convert_channels = False  # allow gray<->RGB conversion (else a mismatch is an error)
  # '' = tfds record order; 'id' = sort by the integer in the 'id' feature (torchvision order for
  # cifar10/100)
  c.data.tfds_order = ''

  c.split = ml_collections.ConfigDict()
  c.split.file = ''  # split file (.npz SecMI/PIA format or .json manifest); '' = make one
  c.split.num_members = 25000  # members (training set of the target) when making a split
  c.split.num_nonmembers = 25000  # non-members when making a split
  c.split.seed = 0  # seed of the random permutation that makes the split
  # 'start:stop' index ranges the members / non-members are drawn from (both or neither): a public
  # target trained on a fixed part of the dataset ('' = the whole dataset, a random split)
  c.split.member_range = ''
  c.split.nonmember_range = ''
  # comma lists of label ids the members / non-members are drawn from (both or neither, disjoint):
  # a class-shifted split, e.g. '0,1,2,3,4' and '5,6,7,8,9' ('' = any class)
  c.split.member_classes = ''
  c.split.nonmember_classes = ''
  # image folders of the members / non-members (both or neither): audit every image of each,
  # instead of a split of config.data (split.num_*, file, ranges, classes do not apply; '' = none)
  c.split.members_dir = ''
  c.split.nonmembers_dir = ''

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000  # T of the target model
  c.diffusion.beta_schedule = 'linear'  # 'linear', 'scaled_linear' (LDM) or 'cosine'
  c.diffusion.beta_start = 1e-4  # first linear beta
  c.diffusion.beta_end = 0.02  # last linear beta

  c.model = ml_collections.ConfigDict()
  c.model.ch = 128  # base channels
  c.model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution level
  c.model.num_res_blocks = 2  # residual blocks per level (down path; up path has one more)
  c.model.attn_res = (16,)  # resolutions with self-attention (the middle block always has it)
  c.model.dropout = 0.1  # dropout in residual blocks (training only)
  c.model.norm_groups = 32  # GroupNorm groups
  c.model.norm_eps = 1e-5  # GroupNorm epsilon (pytorch-ddpm 1e-5, diffusers 1e-6)
  c.model.time_embed_layout = 'interleaved'  # sinusoid order: 'interleaved', 'sin_cos', 'cos_sin'
  c.model.time_freq_shift = 0  # sinusoid frequency shift (pytorch-ddpm 0, diffusers 1)
  c.model.downsample_padding = 'symmetric'  # 'symmetric' (pytorch-ddpm) or 'asymmetric' (diffusers)
  c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'

  c.train = ml_collections.ConfigDict()
  c.train.steps = 800_000  # optimizer steps
  c.train.batch_size = 128  # global batch size (divisible by the device count)
  c.train.lr = 2e-4  # Adam learning rate after warm-up
  c.train.warmup_steps = 5000  # linear warm-up steps
  c.train.grad_clip = 1.0  # global-norm gradient clipping
  c.train.ema_decay = (
    0.9999  # EMA decay (after a warm-up (1+step)/(10+step)) of the weights attacks use
  )
  c.train.random_flip = True  # random horizontal flip augmentation
  c.train.log_every = 100  # steps between log lines
  c.train.checkpoint_every = 5000  # steps between checkpoints
  c.train.keep_checkpoints = 3  # checkpoints kept in the workdir

  c.drc = ml_collections.ConfigDict()
  # 'center_box', 'random_box', 'random_patches', 'saliency_patches', 'face' (the detected face
  # box, MTCNN; the centre box with a warning where none is found); 'downsample', 'grayscale'
  c.drc.mask = 'center_box'
  c.drc.saliency = (
    'foreground'  # 'saliency_patches' map: 'foreground' or 'dino' (a ViT's attention)
  )
  c.drc.saliency_encoder = ''  # 'dino': encoder directory of a ViT (python -m drc_jax.convert)
  c.drc.face_detector = ''  # 'face': MTCNN weights (.safetensors); '' = facenet-pytorch's own
  c.drc.mask_ratio = 0.5  # fraction of the image removed (rho)
  c.drc.invert_mask = False  # remove the complement of the mask region instead
  c.drc.patch_size = 4  # patch size of the patch masks
  c.drc.restorer = 'ddim'  # 'ddim' (inpainting), 'repaint' or 'ddnm'
  c.drc.steps = 50  # reverse steps (RePaint: respaced steps; DDIM/DDNM: number of steps)
  c.drc.t_start = 1000  # DDIM/DDNM start time (< T starts from the noised degraded image)
  c.drc.eta = 0.0  # DDIM eta (0 = deterministic)
  c.drc.jump_length = 10  # RePaint jump length
  c.drc.jump_n_sample = 10  # RePaint resamples per jump
  c.drc.num_restorations = 4  # K restorations per image (different keys), one similarity each
  # how the K restorations run: 'scan' (K programs of the batch in turn) or 'batch' (one batch of
  # K x B images; more work per call, K times the memory)
  c.drc.restorations = 'scan'
  c.drc.comparator = 'masked_mse'  # 'masked_mse', 'psnr', 'ssim', 'ssim_region', 'cosine'
  c.drc.compare_encoder = ''  # 'cosine': encoder directory (CLIP, face-ID, DINO)
  # One score from the K similarities: 'mean', 'median' or 'agree' (the paper's agree number: how
  # many of the K restorations vote member, a vote = similarity above the vote threshold)
  c.drc.aggregation = 'mean'
  # the vote threshold: this quantile of the calibration non-members' similarities (every
  # restoration pooled); used by aggregation='agree' and the agree plot
  c.drc.vote_quantile = 0.5

  c.attacks = ml_collections.ConfigDict()
  c.attacks.names = 'drc,loss,secmi,pia,pian,sima,rediffuse'  # attacks run in one pass (comma list)
  c.attacks.loss_t = 200  # Loss attack timestep
  c.attacks.secmi_t = 100  # SecMI t_sec
  c.attacks.secmi_k = 10  # SecMI DDIM interval
  c.attacks.pia_t = 200  # PIA / PIAN timestep
  c.attacks.pia_p = 4  # PIA norm exponent
  c.attacks.sima_t = 100  # SimA timestep
  # ReDiffuse: the authors' code's DDIM defaults (lijingwei0502/diffusion_mia, DDIM/attack.py)
  c.attacks.rediffuse_t = 200  # ReDiffuse diffusion step t the image is noised to
  c.attacks.rediffuse_k = 100  # ReDiffuse DDIM interval k back to 0 (t / k model calls a draw)
  c.attacks.rediffuse_n = 10  # ReDiffuse draws averaged (n t / k model calls per image)

  # Text-conditioned targets (Stable Diffusion, or one trained here with config.text_model): each
  # image's caption is part of the data (data/captions.py) and the attacks run under it.
  c.text = ml_collections.ConfigDict()
  c.text.captions = ''  # '' (unconditional), 'class_template' or 'file' (captions.jsonl, .txt)
  c.text.template = 'a photo of a {}'  # 'class_template': filled with the class name, lower case
  c.text.captions_file = ''  # 'file': a captions file ('' = each folder's captions.jsonl)
  c.text.guidance_scale = 1.0  # classifier-free guidance of DRC's restorations (1 = none)
  c.text.attack_guidance_scale = 1.0  # ... of Loss, SecMI, PIA(N), SimA, ReDiffuse (CLiD: none)
  c.text.caption_dropout = 0.1  # training a text target: captions replaced by '' this often
  c.text.clid_captions = 'thirds'  # CLiD's degraded captions: 'thirds' of the text, or 'none'

  c.audit = ml_collections.ConfigDict()
  c.audit.batch_size = 64  # global batch of images per attack step (padded at the end)
  c.audit.shard_size = 512  # images per score shard file (the unit of resume)
  c.audit.checkpoint = ''  # target to audit ('' = the EMA weights trained in the workdir)
  c.audit.max_images = 0  # audit at most this many of each set (0 = all), for smoke runs
  c.audit.calibration_fraction = 0.2  # fraction of each set that fits the decision threshold
  c.audit.calibration = 'quantile'  # per-image calibration: 'none' or 'quantile' (calibration.py)
  c.audit.calibration_fpr = 0.01  # 'quantile': predict each image's non-member 1 - this quantile
  c.audit.calibration_l2 = 1e-3  # 'quantile': ridge penalty on the standardized feature weights
  c.audit.bootstrap = 1000  # bootstrap resamples for 95% intervals
  c.audit.num_evidence = 4  # panels per kind (highest, lowest, borderline; strongest suspects)
  c.audit.num_samples = 256  # target samples for the report's sample-quality check (0 = none)

  c.dataset = ml_collections.ConfigDict()  # --mode=dataset (dataset_inference.py)
  c.dataset.suspect_dir = ''  # image folder of the suspect set ('' = draw it, see dataset.suspect)
  c.dataset.name = ''  # the set's name ('' = its folder's, or members-<size> / nonmembers-<size>)
  c.dataset.suspect = ''  # experiments: 'members' or 'nonmembers' of the split's held-out part
  c.dataset.size = 50  # suspect images drawn when dataset.suspect is set
  c.dataset.reference_dir = ''  # image folder of known non-members ('' = the split's non-members)
  c.dataset.alpha = 0.01  # significance level of the verdict (one-sided test, combined scores)
  c.dataset.combiner = 'zsum'  # zsum: scores standardized on reference, summed (no member labels)
  c.dataset.seed = 0  # seed of the suspect draw and of the power-curve draws
  c.dataset.power_sizes = (1, 2, 5, 10, 20, 50, 100)  # suspect sizes of the power curve (() = none)
  c.dataset.power_repetitions = 400  # random sets per size and kind (>= 368 shows FPR <= 0.01)
  return c


_TRUE = ('true', '1', 'yes')
_FALSE = ('false', '0', 'no')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal,res=64' into {'runlocal': True, 'res': 64} with typed defaults.

  Every key must be one of ``defaults`` (a typo is an error naming it); a boolean takes
  true/false/1/0/yes/no (anything else is an error, not False), other values their default's type.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or '').split(','):
    if not item:
      continue
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if not _:
      out[key] = True
    elif isinstance(default, bool):
      v = value.strip().lower()
      if v not in _TRUE + _FALSE:
        raise ValueError(
          f'config argument {key}={value!r}: expected a boolean ({"/".join(_TRUE + _FALSE)})'
        )
      out[key] = v in _TRUE
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
          f'config argument {key}={value!r}: expected {type(default).__name__} ({e})'
        ) from e
  return out


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a CPU smoke run (tiny model, few images, few steps)."""
  c.smoke_run = True
  c.model.ch = 16
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.norm_groups = 8
  c.model.attn_res = (c.data.resolution // 2,)
  c.model.dropout = 0.0
  c.split.num_members = 32
  c.split.num_nonmembers = 32
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.warmup_steps = 5
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.drc.steps = 4
  c.drc.num_restorations = 2
  c.drc.jump_length = 2
  c.drc.jump_n_sample = 2
  c.audit.batch_size = 16
  c.audit.shard_size = 32
  c.audit.bootstrap = 50
  c.audit.num_evidence = 1
  c.audit.num_samples = 16


def set_paper_drc(c: ml_collections.ConfigDict) -> None:
  """The paper's restorer (``protocol.PAPER``: deterministic DDIM inpainting, interval 5), ratio
  and K with the encoder-free pixel steps (centre box, masked MSE, mean of K), and the audit
  batching of the paper-size configs (cifar10/100, celeba, ffhq)."""
  protocol.paper_pixel(c.drc)
  c.audit.batch_size = 256  # images per attack step (a multiple of 8 devices)
  c.audit.shard_size = 2048  # images per score shard


def set_paper_semantic_drc(
  c: ml_collections.ConfigDict, mask: str, runlocal: bool, compare_random: str
) -> None:
  """The paper's DRC (``protocol.PAPER``): the important region removed (``mask`` 'dino': the
  top-rho 4x4 patches of a DINO ViT's CLS attention; 'face': the detected face box), a semantic
  comparison (cosine of an encoder's embeddings) and the agree number. The encoder directories
  come from ``config.drc.saliency_encoder`` / ``compare_encoder`` (a missing one is an error
  naming the field); ``runlocal`` uses tiny random encoders instead (``encoders.RANDOM``)."""
  protocol.paper_semantic(c.drc, mask)
  if runlocal:
    if mask == 'dino':
      c.drc.saliency_encoder = 'random:vit-tiny'
    c.drc.compare_encoder = compare_random


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of a config file ``path[:variant]``, loaded as ``--config=`` loads it."""
  path, _, variant = str(spec).partition(':')
  if not os.path.isfile(path):
    raise errors.UserError(f'{path}: config file not found')
  key = 'drc_jax_config_' + ''.join(ch if ch.isalnum() else '_' for ch in os.path.abspath(path))
  spec_ = importlib.util.spec_from_file_location(key, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(variant or None)


def sibling(config_file: str, name: str):
  """Imports ``<dir of config_file>/<name>.py``: the shared helpers of config files (a config is
  loaded by path, so ``configs/`` is not a package on ``sys.path``)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  key = 'drc_jax_configs.' + ''.join(ch if ch.isalnum() else '_' for ch in path)  # per file
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


def field_comments() -> dict[str, str]:
  """{'section.field': its one-line meaning} in ``base_config``'s order: the comment on the
  field's own lines, else the comment lines above it (shared by the fields that follow them)."""
  source = textwrap.dedent(inspect.getsource(base_config))
  out: dict[str, str] = {}
  block: list[str] = []  # comment lines above the current statement
  inline: list[str] = []  # comments on the current statement's lines
  field, used = None, False  # the statement's tokens as text; whether ``block`` was used
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      if field is not None:
        inline.append(tok.string.lstrip('#').strip())
      else:
        if used:
          block, used = [], False
        block.append(tok.string.lstrip('#').strip())
    elif tok.type == tokenize.NAME and field is None and tok.string == 'c' and tok.start[1] == 2:
      field = ''
    elif field is not None and tok.type in (tokenize.NAME, tokenize.OP) and '=' not in field:
      field += tok.string
    elif tok.type == tokenize.NEWLINE:
      name = (field or '').split('=')[0].lstrip('.')
      if name and '=' in field:  # sections (c.data = ConfigDict()) too; describe() skips them
        out[name] = ' '.join(inline or block)
        used = not inline
        if inline:
          block = []
      field, inline = None, []
  return out


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of ``config`` with its value and meaning, one per line (``--help_config``)."""
  comments = field_comments()
  flat: dict[str, object] = {}

  def walk(d, prefix):
    for key in d:
      if isinstance(d[key], ml_collections.ConfigDict):
        walk(d[key], f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = d[key]

  walk(config, '')
  order = [n for n in comments if n in flat] + sorted(set(flat) - set(comments))
  lines, section = [], None
  for name in order:
    head = name.rpartition('.')[0]
    if head != section and lines:
      lines.append('')
    section = head
    meaning = comments.get(name, '')
    lines.append(f'  --config.{name}={flat[name]!r}' + (f'  # {meaning}' if meaning else ''))
  return '\n'.join(lines)
