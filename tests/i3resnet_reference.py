"""An independent reference for the Merlin I3ResNet: its forward written from Merlin's
``merlin/models/i3res.py`` with plain ``torch.nn.functional`` calls over a state dict (permute to
Z, X, Y; the channel repeated three times; strides and paddings as upstream inflates them), and a
small checkpoint in the exact upstream layout built from torchvision's ResNet. Neither uses
medtransfer's builder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def upstream_forward(state_dict, x, layers, stages=4):
    """Merlin's I3ResNet.forward up to ``layer<stages>``: ``[B, 1, X, Y, Z]`` → ``[B, C, Z', X', Y']``."""
    sd = {k: v.float() for k, v in state_dict.items() if v.is_floating_point()}
    x = x.permute(0, 1, 4, 2, 3)
    x = torch.cat((x, x, x), dim=1)
    x = F.relu(_bn(F.conv3d(x, sd["conv1.weight"], stride=(1, 2, 2), padding=(1, 3, 3)), sd, "bn1"))
    x = F.max_pool3d(x, kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1))
    for li, blocks in enumerate(layers[:stages], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            s = 2 if li > 1 and b == 0 else 1
            out = F.relu(_bn(F.conv3d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.relu(_bn(F.conv3d(out, sd[f"{p}.conv2.weight"], stride=(s, s, s), padding=(1, 1, 1)), sd, f"{p}.bn2"))
            out = _bn(F.conv3d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=(s, s, s)), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
    return x


SMALL = (1, 2, 1, 1)


def _inflated(key, w2d, g):
    """A 2D torchvision kernel inflated as Merlin's inflate_conv does (7x7 stem: depth 3; 3x3: depth 3;
    1x1: depth 1), filled with random values so that every depth slice matters."""
    depth = 3 if w2d.shape[-1] in (3, 7) else 1
    fan_in = w2d.shape[1] * depth * w2d.shape[-1] * w2d.shape[-2]
    return torch.randn(*w2d.shape[:2], depth, *w2d.shape[2:], generator=g) * (2.0 / fan_in) ** 0.5


def synthetic_upstream_state_dict(layers=SMALL, seed=0):
    """The upstream layout from torchvision's ResNet (Bottleneck v1.5) inflated to 3D: bf16 tensors,
    int64 BatchNorm counters, no ``fc``."""
    g = torch.Generator().manual_seed(seed)
    net2d = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(layers))
    out = {}
    for k, v in net2d.state_dict().items():
        if k.startswith("fc."):
            continue
        if v.ndim == 4:
            v = _inflated(k, v, g)
        elif k.endswith("num_batches_tracked"):
            v = torch.tensor(1234, dtype=torch.int64)
        elif k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) * 1.5 + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("weight"):
            v = torch.rand(v.shape, generator=g) * 0.5 + 0.5
        out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    return out
