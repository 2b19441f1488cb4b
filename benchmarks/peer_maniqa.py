"""Peer check of the quality branch: pyiqa's MANIQA port against ours, at the paper config's full size.

Both are built with random weights (no download: timm's ViT-B/8 class without its pretrained weights);
pyiqa's state dict is mapped onto ours with ``ma_agiqa.maniqa.from_reference_state_dict``; both score the
same images. Prints what did not map, and the largest differences of the per-patch scores f, weights w and
MANIQA's score sum(f*w)/sum(w), for the reference layout (the paper config) and, on the same weights, for the
clean transposed-attention layout.

pyiqa is not a dependency of this project (it requires some twenty packages); its MANIQA needs only torch,
timm, einops and, through pyiqa's package imports, OpenCV:

    pip install --no-deps --target /tmp/peerlib pyiqa==0.1.16 einops opencv-python-headless
    PYTHONPATH=/tmp/peerlib python benchmarks/peer_maniqa.py [--images 2] [--seed 0]
    python benchmarks/peer_maniqa.py --smoke   # seconds: the same check at tiny-random's widths, one image

tests/test_reference_layout.py runs the same check on a 32-wide ViT when pyiqa can be imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="ma-agiqa-paper", help="a registered config whose quality branch to check")
    p.add_argument("--smoke", action="store_true",
                   help="seconds, for the test suite: the config's layout at tiny-random's widths (a 32-wide ViT), one image")
    args = p.parse_args(argv)

    import timm
    from pyiqa.archs import maniqa_arch
    from pyiqa.version import __version__ as pyiqa_version

    from ma_agiqa import get_config
    from ma_agiqa.maniqa import MANIQA, from_reference_state_dict

    cfg = dataclasses.replace(get_config(args.model).quality, pretrained=None)
    if args.smoke:
        tiny = get_config("tiny-random").quality
        cfg = dataclasses.replace(cfg, backbone=tiny.backbone, backbone_kwargs=tiny.backbone_kwargs,
                                  embed_dim=tiny.embed_dim, num_heads=tiny.num_heads, dim_mlp=tiny.dim_mlp)
        args.images = 1
    create = timm.create_model
    # no download; pyiqa builds its ViT by name, so it gets the config's backbone arguments too
    timm.create_model = lambda name, pretrained=False, **kw: create(name, pretrained=False, **{**cfg.backbone_kwargs, **kw})
    maniqa_arch.uniform_crop = lambda x, crop_size, crop_num: x  # one whole-image view, as the reference's
    try:
        torch.manual_seed(args.seed)
        peer = maniqa_arch.MANIQA(embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                                  window_size=cfg.window_size, dim_mlp=cfg.dim_mlp, num_tab=cfg.num_tab,
                                  scale=cfg.scale, test_sample=1, pretrained=False).eval()
    finally:
        timm.create_model = create
    ours = MANIQA(cfg, load_pretrained=False).eval()
    mapped, left = from_reference_state_dict(ours, peer.state_dict())
    params = dict(peer.named_parameters())
    ours.load_state_dict(mapped)
    captured = {}
    peer.fc_score.register_forward_hook(lambda m, i, o: captured.__setitem__("f", o.squeeze(-1)))
    peer.fc_weight.register_forward_hook(lambda m, i, o: captured.__setitem__("w", o.squeeze(-1)))
    images = torch.rand(args.images, 3, cfg.views.size, cfg.views.size, generator=torch.Generator().manual_seed(1))
    views = (images - torch.tensor(cfg.views.mean).view(3, 1, 1)) / torch.tensor(cfg.views.std).view(3, 1, 1)
    result = {"pyiqa": pyiqa_version, "timm": timm.__version__, "torch": torch.__version__, "model": args.model,
              "backbone": cfg.backbone, **({"backbone_kwargs": cfg.backbone_kwargs} if cfg.backbone_kwargs else {}), "images": args.images, "mapped_tensors": len(mapped),
              # what has no counterpart here: parameters by module, buffers (recomputed by timm) by name
              "left_out_parameters": sorted({k.rsplit(".", 1)[0] for k in left if k in params}),
              "left_out_buffers": sorted({k.rsplit(".", 1)[1] for k in left if k not in params})}
    with torch.no_grad():
        started = time.time()
        peer_score = peer(images).squeeze(1)
        feats = ours.features(views)
        for layout in ("reference", "clean"):
            for t in [*ours.tab1, *ours.tab2]:
                t.layout = layout
            f, w = ours.patch_scores(feats)
            score = (f * w).sum(-1) / w.sum(-1)
            result[layout] = {
                "max_abs_diff_f": float((f - captured["f"]).abs().max()),
                "max_abs_diff_w": float((w - captured["w"]).abs().max()),
                "max_abs_diff_score": float((score - peer_score).abs().max()),
                "score_range": [float(peer_score.min()), float(peer_score.max())],
            }
        result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    return 0 if result["reference"]["max_abs_diff_f"] < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
