"""Ablation-CAM on a layer that returns more than a tensor (a tuple, a transformers ModelOutput, as the hubs'
encoder stages do): the replay gives the model the layer's output in its own structure, its first tensor (the one
the CAM reads) ablated, and the map equals ablating each channel of that tensor by hand with a forward hook."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lightning_vis as lv


@dataclass
class Out(pytest.importorskip("transformers").utils.ModelOutput):
    hidden: torch.Tensor = None
    states: tuple = None  # as transformers' hidden_states: a tuple beside the tensor


class Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv, self.kind = nn.Conv2d(3, 4, 3, padding=1), kind

    def forward(self, x):
        y = self.conv(x).relu()
        return {"tuple": lambda: (y, y * 2),
                "ModelOutput": lambda: Out(hidden=y, states=(y * 2,))}[self.kind]()


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.fc = Block(kind), nn.Linear(8, 3)

    def forward(self, x):
        out = self.block(x)
        y, d = (out[0], out[1]) if isinstance(out, tuple) else (out.hidden, out.states[0])
        return self.fc(torch.cat([y.mean((2, 3)), d.amax((2, 3))], 1))


@pytest.mark.parametrize("kind", ["tuple", "ModelOutput"])  # a plain dict of tensors is refused (hooks.layout)
def test_ablation_cam_through_a_structured_output_equals_ablating_by_hand(kind):
    net, x, cls = Net(kind).eval(), torch.rand(2, 3, 6, 6), torch.tensor([1, 2])
    cam = lv.grad_cam(net, x, "block", cls, method="ablationcam")
    with torch.no_grad():
        act = net.block(x)
        act = act[0] if isinstance(act, tuple) else act.hidden
        base = net(x).gather(1, cls[:, None])[:, 0]
        ablated = []
        for c in range(4):  # the layer is rectified: a channel ablated is zeroed in the tensor the CAM reads (the
            def zero(module, args, output, c=c):  # first); the other fields as the layer gave them
                y, d = (output[0], output[1]) if isinstance(output, tuple) else (output.hidden, output.states[0])
                y = y.clone()
                y[:, c] = 0
                return {"tuple": lambda: (y, d),
                        "ModelOutput": lambda: Out(hidden=y, states=(d,))}[kind]()
            h = net.block.register_forward_hook(zero)
            ablated.append(net(x).gather(1, cls[:, None])[:, 0])
            h.remove()
    weights = (base[:, None] - torch.stack(ablated, 1)) / base[:, None]
    want = (weights[:, :, None, None] * act).sum(1).clamp_min(0)
    torch.testing.assert_close(cam.low_res, want, rtol=1e-4, atol=1e-6)
