"""CLIP's text tower in Flax NNX: what transformers' ``CLIPTextModel`` computes (Stable Diffusion).

Layout (our parameter names; transformers' are the same under ``text_model.``, with
``embeddings.`` before the two tables, ``encoder.`` before ``layers`` and ``weight`` for
``kernel``/``scale``/``embedding``):

* ``token_embedding.embedding`` [vocab_size, D] and ``position_embedding`` [max_positions, D]:
  ``h = token_embedding[ids] + position_embedding[:L]``.
* ``layers.{i}``, ``num_hidden_layers`` pre-LayerNorm blocks: ``layer_norm1`` -> causal multi-head
  self-attention (``self_attn.q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, each with a bias;
  queries scaled by head_dim ** -0.5, token j attends to tokens <= j) -> residual; ``layer_norm2``
  -> ``mlp.fc1`` -> activation -> ``mlp.fc2`` -> residual.
* ``final_layer_norm``. LayerNorm eps ``layer_norm_eps`` (1e-5), two-pass variance as PyTorch's.

Activation ``hidden_act``: ``quick_gelu`` (x * sigmoid(1.702 x); OpenAI CLIP, SD 1.x's
``openai/clip-vit-large-patch14``) or ``gelu`` (exact erf GELU; OpenCLIP ViT-H, SD 2.x).

Outputs: ``encode_text`` is ``last_hidden_state`` [B, L, D] (``text_encoder(ids)[0]``, the
context diffusers' ``StableDiffusionPipeline.encode_prompt`` gives the UNet for SD 1.x and 2.x
alike); with ``clip_skip=k`` it is ``final_layer_norm(hidden_states[-(k + 1)])``, the output of
layer ``N - k`` normed, as ``encode_prompt(..., clip_skip=k)`` computes it (``hidden_states[0]``
is the embeddings, ``hidden_states[i]`` the output of layer i). ``pooled`` is ``pooler_output``.
Ids must lie in [0, vocab_size) (JAX's gather fills an out-of-range row with NaN where torch
raises), and L <= max_position_embeddings (refused). No padding mask: the SD pipelines pass none
(their configs have no ``use_attention_mask``), so padding tokens are attended to causally, as
there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from drc_jax.core import errors
from drc_jax.models import vit

Params = Any
ACTIVATIONS = ('quick_gelu', 'gelu')
LEGACY_EOS_ID = 2  # transformers pools at argmax(ids) when a config says eos_token_id == 2
# transformers' CLIPTextConfig defaults (save_pretrained may leave default fields out)
_HF_DEFAULTS = {
  'vocab_size': 49408,
  'hidden_size': 512,
  'intermediate_size': 2048,
  'num_hidden_layers': 12,
  'num_attention_heads': 8,
  'max_position_embeddings': 77,
  'hidden_act': 'quick_gelu',
  'layer_norm_eps': 1e-5,
  'pad_token_id': 1,
  'bos_token_id': 49406,
  'eos_token_id': 49407,
}
# config.json fields that do not change the forward pass (training, bookkeeping, generation)
_IGNORED = frozenset(
  {
    '_name_or_path', 'architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype',
    'initializer_range', 'initializer_factor', 'attention_dropout', 'dropout', 'projection_dim',
    'output_hidden_states', 'output_attentions', 'return_dict', 'use_return_dict', 'torchscript',
    'use_bfloat16', 'tie_word_embeddings', 'is_encoder_decoder', 'is_decoder',
    'add_cross_attention',
    'chunk_size_feed_forward', 'id2label', 'label2id', 'problem_type', 'finetuning_task',
    'tokenizer_class', 'prefix', 'sep_token_id', 'decoder_start_token_id', 'task_specific_params',
    'cross_attention_hidden_size', 'tf_legacy_loss', 'max_length', 'min_length', 'do_sample',
    'early_stopping', 'num_beams', 'num_beam_groups', 'diversity_penalty', 'temperature', 'top_k',
    'top_p', 'typical_p', 'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size',
    'encoder_no_repeat_ngram_size', 'bad_words_ids', 'num_return_sequences', 'output_scores',
    'return_dict_in_generate', 'forced_bos_token_id', 'forced_eos_token_id',
    'remove_invalid_values', 'exponential_decay_length_penalty', 'suppress_tokens',
    'begin_suppress_tokens', 'pruned_heads', '_attn_implementation_autoset',
    'gradient_checkpointing',
  }
)  # fmt: skip


class TextConfigError(errors.UserError, ValueError):
  """A text-encoder config we do not compute; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a CLIP text tower (the defaults are SD 1.x's, OpenAI's ViT-L/14 text)."""

  vocab_size: int = 49408  # rows of the token embedding
  hidden_size: int = 768  # token width D
  intermediate_size: int = 3072  # hidden width of each layer's MLP
  num_hidden_layers: int = 12  # N encoder layers
  num_attention_heads: int = 12  # heads (D // 64 in CLIP's towers)
  max_position_embeddings: int = 77  # rows of the position embedding: the longest input
  hidden_act: str = 'quick_gelu'  # 'quick_gelu' (OpenAI CLIP) or 'gelu' (exact erf; OpenCLIP)
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  pad_token_id: int = 1  # as the config says (the tokenizer's pad is what matters)
  bos_token_id: int = 49406
  eos_token_id: int = 49407  # pooling: first eos position, or argmax(ids) when it is 2 (legacy)

  def __post_init__(self):
    names = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers')
    for name in (*names, 'num_attention_heads', 'max_position_embeddings'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f'hidden_size {self.hidden_size} is not divisible by num_attention_heads '
        f'{self.num_attention_heads}'
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}')
    if not self.layer_norm_eps > 0:
      raise ValueError(f'layer_norm_eps must be positive, got {self.layer_norm_eps}')

  @classmethod
  def from_hf_config(cls, doc: dict[str, Any], where: str = 'config.json') -> CLIPTextConfig:
    """The config of a transformers ``CLIPTextModel`` ``config.json`` (or a ``CLIPModel``'s
    ``text_config``); absent fields take ``CLIPTextConfig``'s defaults.

    Raises:
      TextConfigError: naming ``where`` and the field: another model_type, an activation other
        than quick_gelu/gelu, pruned heads, a field we do not know, an invalid value.
    """
    if not isinstance(doc, dict):
      raise TextConfigError(f'{where}: expected a JSON object, found {type(doc).__name__}')
    kind = doc.get('model_type', 'clip_text_model')
    if kind == 'clip':
      text = doc.get('text_config') or {}
      return cls.from_hf_config(dict(text, model_type='clip_text_model'), f'{where}: text_config')
    if kind != 'clip_text_model':
      raise TextConfigError(
        f"{where}: model_type {kind!r} is not a CLIP text model ('clip_text_model' or 'clip')"
      )
    unknown = sorted(set(doc) - set(_HF_DEFAULTS) - _IGNORED)
    if unknown:
      raise TextConfigError(
        f'{where}: field {unknown[0]!r} is not supported by the CLIP text tower'
      )
    if doc.get('pruned_heads'):
      raise TextConfigError(f'{where}: field pruned_heads={doc["pruned_heads"]} is not supported')
    values = dict(_HF_DEFAULTS, **{k: v for k, v in doc.items() if k in _HF_DEFAULTS})
    act = values['hidden_act']
    if act not in ACTIVATIONS:
      raise TextConfigError(f'{where}: field hidden_act={act!r} is not one of {ACTIVATIONS}')
    if isinstance(values['eos_token_id'], list):
      raise TextConfigError(f'{where}: field eos_token_id={values["eos_token_id"]} (a list)')
    for key, value in values.items():
      if key == 'hidden_act':
        continue
      number = isinstance(value, (int, float) if key == 'layer_norm_eps' else int)
      if not (number and not isinstance(value, bool)) and not (
        value is None and key.endswith('_token_id')
      ):
        raise TextConfigError(f'{where}: field {key}={value!r} is not a valid number')
    values = {k: -1 if v is None else v for k, v in values.items()}  # a token id may be null
    try:
      return cls(**values)
    except ValueError as e:
      raise TextConfigError(f'{where}: {e}') from e


# SD 1.x: openai/clip-vit-large-patch14's text tower; SD 2.x: OpenCLIP ViT-H/14's, its last layer
# dropped (diffusers' SD 2 text_encoder/config.json: 23 layers); a tiny one for tests.
CONFIGS = {
  'sd1': CLIPTextConfig(eos_token_id=2, bos_token_id=0),
  'sd2': CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act='gelu', bos_token_id=0, eos_token_id=2,
  ),
  'tiny': CLIPTextConfig(
    vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4,
  ),
}  # fmt: skip


class CausalSelfAttention(nnx.Module):
  """CLIPAttention with the causal mask: separate q/k/v/out projections, each with a bias."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.k_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.v_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):  # x: [B, L, D]
    b, n, d = x.shape
    split = (b, n, self.heads, d // self.heads)
    q = self.q_proj(x).reshape(split)  # [B, L, heads, head_dim]
    k, v = self.k_proj(x).reshape(split), self.v_proj(x).reshape(split)
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) * (d // self.heads) ** -0.5  # [B, heads, L, L]
    causal = jnp.tril(jnp.ones((n, n), bool))  # [L, L]: query j sees keys <= j
    logits = jnp.where(causal[None, None], logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, n, d)  # [B, L, D]
    return self.out_proj(out)


class EncoderLayer(nnx.Module):
  """CLIPEncoderLayer: x + attn(layer_norm1(x)), then + mlp(layer_norm2(x))."""

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    d, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.layer_norm1 = vit.layer_norm(d, eps, rngs)
    self.self_attn = CausalSelfAttention(d, cfg.num_attention_heads, rngs)
    self.layer_norm2 = vit.layer_norm(d, eps, rngs)
    self.mlp = vit.Mlp(d, cfg.intermediate_size, cfg.hidden_act, rngs)

  def __call__(self, x):  # x: [B, L, D]
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nnx.Module):
  """CLIP's text tower; ``hidden_states(ids)`` and ``final_layer_norm`` (see the module doc)."""

  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.token_embedding = nnx.Embed(
      cfg.vocab_size, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )
    self.position_embedding = nnx.Param(
      0.01 * jax.random.normal(rngs.params(), (cfg.max_position_embeddings, d), jnp.float32)
    )
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = vit.layer_norm(d, cfg.layer_norm_eps, rngs)

  def hidden_states(self, ids, upto: int | None = None) -> list[jnp.ndarray]:
    """[embeddings, layer 1's output, ...], each [B, L, D] (``output_hidden_states``'s tuple).

    Args:
      ids: int [B, L] token ids, L <= max_position_embeddings.
      upto: run layers 1..upto only (default all N).
    """
    n = ids.shape[-1]
    if n > self.cfg.max_position_embeddings:
      raise ValueError(
        f'CLIP text: {n} tokens exceed max_position_embeddings {self.cfg.max_position_embeddings}'
      )
    h = self.token_embedding(ids) + self.position_embedding[...][:n][None]  # [B, L, D]
    out = [h]
    for layer in self.layers[: self.cfg.num_hidden_layers if upto is None else upto]:
      h = layer(h)
      out.append(h)
    return out


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoder:
  """A CLIP text tower as (config, graphdef): pure functions of a params pytree, for jit."""

  config: CLIPTextConfig
  graphdef: Any

  @classmethod
  def create(cls, config: CLIPTextConfig, seed: int = 0) -> tuple[CLIPTextEncoder, Params]:
    """The model and freshly initialised params (random embeddings, Flax's default kernels)."""
    graphdef, state = nnx.split(CLIPTextTransformer(config, nnx.Rngs(params=seed)))
    return cls(config, graphdef), nnx.to_pure_dict(state)

  @classmethod
  def abstract(cls, config: CLIPTextConfig) -> tuple[CLIPTextEncoder, Params]:
    """The model and a params pytree of ShapeDtypeStructs (no allocation); see ``abstract``."""
    return abstract_text_encoder(config)

  def _merge(self, params: Params) -> CLIPTextTransformer:
    return nnx.merge(self.graphdef, params)

  def encode_text(self, params: Params, ids: jnp.ndarray, clip_skip: int | None = None):
    """The text context: ``last_hidden_state``, or diffusers' ``clip_skip`` hidden state.

    Args:
      params: the params pytree.
      ids: int [B, L] token ids (``clip_tokenizer``'s, L = 77 for SD).
      clip_skip: None or 0 for ``last_hidden_state``; k in 1..N-1 for
        ``final_layer_norm(hidden_states[-(k + 1)])`` (layers N-k+1..N skipped), as diffusers'
        ``encode_prompt(clip_skip=k)``.

    Returns:
      float32 [B, L, hidden_size].
    """
    n = self.config.num_hidden_layers
    k = clip_skip or 0
    if not 0 <= k < n:
      raise ValueError(f'clip_skip={clip_skip} is not in 0..{n - 1} ({n} layers)')
    model = self._merge(params)
    return model.final_layer_norm(model.hidden_states(ids, upto=n - k)[-1])

  def hidden_states(self, params: Params, ids: jnp.ndarray) -> list[jnp.ndarray]:
    """``output_hidden_states``: N + 1 arrays [B, L, D] (embeddings, then each layer's output)."""
    return self._merge(params).hidden_states(ids)

  def pooled(self, params: Params, ids: jnp.ndarray) -> jnp.ndarray:
    """``pooler_output`` [B, D]: ``last_hidden_state`` at the first eos (at argmax(ids) when the
    config's eos_token_id is the legacy 2; at position 0 when a row has no eos, as
    transformers' argmax of an all-false mask gives)."""
    last = self.encode_text(params, ids)  # [B, L, D]
    if self.config.eos_token_id == LEGACY_EOS_ID:
      where = jnp.argmax(ids, axis=-1)
    else:
      where = jnp.argmax(ids == self.config.eos_token_id, axis=-1)  # [B]
    return jnp.take_along_axis(last, where[:, None, None], axis=1)[:, 0]


@functools.lru_cache(maxsize=8)
def abstract_text_encoder(config: CLIPTextConfig) -> tuple[CLIPTextEncoder, Params]:
  """``(CLIPTextEncoder, params of ShapeDtypeStructs)``, cached per config (do not mutate)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIPTextTransformer(config, nnx.Rngs(0))))
  return CLIPTextEncoder(config, graphdef), nnx.to_pure_dict(state)


def encode_text(
  config: CLIPTextConfig, params: Params, ids: jnp.ndarray, clip_skip: int | None = None
) -> jnp.ndarray:
  """``CLIPTextEncoder.encode_text`` for ``config``: int [B, L] ids -> float32 [B, L, D]."""
  return abstract_text_encoder(config)[0].encode_text(params, ids, clip_skip)
