"""Encoder import check on configurations the tests do not use: one random-weight model per family,
saved as the public files are laid out, converted by the command line, compared with PyTorch.

  python launch/verify_encoders.py            # needs the torch and reference extras

Prints one line per model with the max |difference| of ``load_encoder(DIR).embed`` against the
PyTorch output (the bar is 1e-4) and exits 1 if any is above it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import open_clip
import timm
import torch
import transformers
from facenet_pytorch import InceptionResnetV1
from safetensors.torch import save_file

from drc_jax import load_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perturb(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or 'token' in name or 'embed' in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
      if 'running_var' in name:
        b.uniform_(0.5, 1.5, generator=gen)
      elif 'running_mean' in name:
        b.normal_(0.0, 0.1, generator=gen)
  return model.eval()


def convert(fmt, src, out, *extra):
  subprocess.run(
    [sys.executable, '-m', 'drc_jax.convert', f'--format={fmt}', f'--src={src}', f'--out={out}']
    + list(extra),
    check=True,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  return load_encoder(out)


def check(name, enc, want, x):
  got = np.asarray(enc.embed(x.permute(0, 2, 3, 1).numpy()))
  diff = float(np.max(np.abs(got - want.detach().numpy())))
  print(f'{name:58s} embed {tuple(got.shape)} max |diff| {diff:.2e}', flush=True)
  return diff


def main():
  torch.manual_seed(0)
  diffs = []
  with tempfile.TemporaryDirectory() as tmp:
    # timm ViT-B/16 (DINO's ViT-B/16 layout), input 160: position embeddings resampled 14 -> 10.
    m = perturb(timm.create_model('vit_base_patch16_224', num_classes=0, dynamic_img_size=True), 1)
    src = os.path.join(tmp, 'dino_vitbase16_pretrain.pth')
    torch.save({k: v.contiguous() for k, v in m.state_dict().items()}, src)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
      diffs.append(
        check('timm-vit ViT-B/16 (86M) at 160x160', convert('timm-vit', src, f'{tmp}/v'), m(x), x)
      )
    # OpenCLIP ViT-B-16 (GELU), a bare safetensors file.
    m = perturb(open_clip.create_model('ViT-B-16', pretrained=None), 2)
    src = os.path.join(tmp, 'open_clip_b16.safetensors')
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, src)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
      want = m.encode_image(x)
    enc = convert('open-clip', src, f'{tmp}/c', '--activation=gelu')
    diffs.append(check('open-clip ViT-B-16 (GELU) at 224x224', enc, want, x))
    # Hugging Face CLIPVisionModelWithProjection, patch 14 at 112, 6 layers of width 384.
    cfg = transformers.CLIPVisionConfig(
      hidden_size=384,
      intermediate_size=1536,
      num_hidden_layers=6,
      num_attention_heads=6,
      image_size=112,
      patch_size=14,
      projection_dim=256,
      hidden_act='quick_gelu',
    )
    m = perturb(transformers.CLIPVisionModelWithProjection(cfg), 3)
    folder = os.path.join(tmp, 'hf')
    m.save_pretrained(folder)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
      want = m(pixel_values=x).image_embeds
    diffs.append(
      check('hf-clip 6x384, patch 14 at 112x112', convert('hf-clip', folder, f'{tmp}/h'), want, x)
    )
    # facenet InceptionResnetV1 (CASIA head of 10575 classes in the file), input 200x176.
    m = perturb(InceptionResnetV1(classify=False, num_classes=10575), 4)
    src = os.path.join(tmp, 'casia.pt')
    torch.save(m.state_dict(), src)
    x = torch.randn(2, 3, 200, 176)
    with torch.no_grad():
      diffs.append(
        check('facenet InceptionResnetV1 at 200x176', convert('facenet', src, f'{tmp}/f'), m(x), x)
      )
  worst = max(diffs)
  print(f'worst {worst:.2e} (bar 1e-4): {"OK" if worst <= 1e-4 else "FAILED"}')
  return 0 if worst <= 1e-4 else 1


if __name__ == '__main__':
  sys.exit(main())
