"""AttnLRP and CP-LRP (lv.lrp on attention models): the rules by hand on a one-dimensional attention of two tokens,
conservation where the rules conserve, equal to lxt 2.1 (its authors' package) where it supports a model
(torchvision's ViT with its CP-LRP map, GPT-2 with its AttnLRP map), the same relevance through every attention path
(fused scaled_dot_product_attention and explicit matmul + softmax; timm, Hugging Face), batched == unbatched, the
models of the zoo's attention families (torchvision ViT / Swin, timm ViT / DeiT / Swin, Hugging Face ViT), refusals
and the model left as it was."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vis as lv
from lightning_vis.hooks import hook_counts

A, B, C = 0.7, -1.3, 2.0  # the query, key and value weights of the one-dimensional attention
X = [0.9, -0.4]  # two tokens, one feature each


class Tiny(nn.Module):
    """q = a x, k = b x, v = c x (bias-free, 1 -> 1), one head over two tokens; logits: the attention's outputs."""

    def __init__(self, explicit: bool):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(1, 1, bias=False) for _ in range(3))
        for lin, w in zip((self.q, self.k, self.v), (A, B, C)):
            nn.init.constant_(lin.weight, w)
        self.explicit = explicit

    def forward(self, x):  # (N, 2, 1)
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.explicit:
            out = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return out.flatten(1)  # (N, 2): token i's output is class i


def by_hand(i: int) -> tuple[list[float], float]:
    """AttnLRP of output token i, rule by rule with scalars: the relevance of x and the softmax's leak."""
    q, k, v = [A * x for x in X], [B * x for x in X], [C * x for x in X]
    logits = [q[i] * k[j] for j in range(2)]
    p = [math.exp(lg) / sum(math.exp(m) for m in logits) for lg in logits]
    out = sum(p[j] * v[j] for j in range(2))
    r = [0.0, 0.0]
    r_p = [0.5 * p[j] * v[j] for j in range(2)]  # uniform rule at p @ v: R_out = out, half of p_j v_j to each
    for j in range(2):
        r[j] += 0.5 * p[j] * v[j]  # the values' half, through v = c x (epsilon rule, no bias: all of it)
    r_logits = [logits[j] * (r_p[j] - p[j] * sum(r_p)) for j in range(2)]  # softmax: x (R - s sum R)
    for j in range(2):  # uniform rule at q_i k_j: half to q_i (token i), half to k_j (token j)
        r[i] += 0.5 * r_logits[j]
        r[j] += 0.5 * r_logits[j]
    return r, sum(r_p) - sum(r_logits)


@pytest.mark.parametrize("explicit", [True, False])
def test_attention_of_two_tokens_by_hand(explicit):
    x = torch.tensor([[[X[0]], [X[1]]]], dtype=torch.float64)
    net = Tiny(explicit).double()
    for i in range(2):
        r = lv.lrp(net, x, i, composite="attnlrp", epsilon=0.0)
        expect, leak = by_hand(i)
        torch.testing.assert_close(r.maps[0, :, 0], torch.tensor(expect, dtype=torch.float64))
        # what the softmax's linearisation leaves out is all that is missing from the score
        torch.testing.assert_close(r.maps.sum() + leak, r.scores[0])
        assert abs(leak) > 1e-3  # the example does exercise the softmax rule
    # CP-LRP: the probabilities are constants, all relevance goes through the values, conserved
    r = lv.lrp(net, x, 0, composite="cp-lrp", epsilon=0.0)
    with torch.no_grad():
        p = torch.softmax(net.q(x) @ net.k(x).transpose(1, 2), -1)[0, 0]
    torch.testing.assert_close(r.maps[0, :, 0], p * C * x[0, :, 0])


class SelfAttention(nn.Module):
    def __init__(self, d, heads, explicit):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.heads, self.explicit = heads, explicit

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.explicit:
            o = (q @ k.transpose(-2, -1) * q.shape[-1] ** -.5).softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(n, length, d))


class Block(nn.Module):
    """A pre-norm transformer block with no biases anywhere (LayerNorm without bias, bias-free projections)."""

    def __init__(self, d=8, heads=2, explicit=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attention = SelfAttention(d, heads, explicit)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d, bias=False), nn.SiLU(inplace=True),  # run out of place
                                 nn.Linear(2 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self, explicit=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(explicit=explicit), Block(explicit=explicit))
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):  # (N, tokens, 8)
        return self.head(self.blocks(x).mean(1))


TOKENS = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))


class InPlaceHead(Tiny):
    """Tiny, then a Linear head (the identity) whose output the model shifts in place, as OWL-ViT's box predictor
    does (pred_boxes += box_bias)."""

    def __init__(self):
        super().__init__(explicit=False)
        self.head = nn.Linear(2, 2, bias=False)
        nn.init.eye_(self.head.weight)

    def forward(self, x):
        y = self.head(super().forward(x))
        y += 1.0
        return y


def test_a_linear_output_the_model_changes_in_place():
    """The epsilon rule's hook on a Linear gives the network a tensor it may modify in place (it gave a view from a
    custom Function: torch refused the in-place add); the relevance is the by-hand one (the head is the identity and
    a constant shift has no gradient)."""
    x = torch.tensor([[[X[0]], [X[1]]]], dtype=torch.float64)
    net = InPlaceHead().double()
    for i in range(2):
        r = lv.lrp(net, x, i, composite="attnlrp", epsilon=1e-12)
        torch.testing.assert_close(r.maps[0, :, 0], torch.tensor(by_hand(i)[0], dtype=torch.float64))


def test_conservation_where_the_rules_conserve():
    """CP-LRP on a bias-free net: the sum of the input's relevance is the target score (epsilon -> 0: 0 and 1e-9);
    AttnLRP moves relevance through the softmaxes, whose linearisation does not conserve: it differs."""
    net = Net().eval()
    for eps in (0.0, 1e-9):
        r = lv.lrp(net, TOKENS, 2, composite="cp-lrp", epsilon=eps)
        torch.testing.assert_close(r.maps.flatten(1).sum(1), r.scores, rtol=1e-4, atol=1e-6)
    a = lv.lrp(net, TOKENS, 2, composite="attnlrp", epsilon=0.0)
    assert not torch.allclose(a.maps, r.maps, rtol=1e-2)


def test_fused_and_explicit_attention_agree_and_batches():
    fused, explicit = Net(False).eval(), Net(True).eval()
    explicit.load_state_dict(fused.state_dict())
    for composite in ("attnlrp", "cp-lrp"):
        a = lv.lrp(fused, TOKENS, None, composite=composite)
        b = lv.lrp(explicit, TOKENS, None, composite=composite, chunk_size=1)
        torch.testing.assert_close(a.maps, b.maps, rtol=1e-4, atol=1e-6)
        one = lv.lrp(fused, TOKENS[1:2], a.targets[1:2], composite=composite)
        torch.testing.assert_close(one.maps[0], a.maps[1], rtol=1e-4, atol=1e-6)
    assert lv.lrp(fused, TOKENS, 0).method == "lrp-attnlrp"  # the default for a model with attention layers


def test_the_model_is_left_as_it_was():
    net = Net().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = hook_counts(net)
    lv.lrp(net, TOKENS, 1)
    assert all(m.training for m in net.modules()) and hook_counts(net) == hooks and net.blocks[0].mlp[1].inplace
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    a, b = torch.ones(2, 2, requires_grad=True), torch.full((2, 2), 3.0, requires_grad=True)
    (a @ b).sum().backward()  # the rules are scoped to the pass: a product afterwards is torch's own
    assert a.grad.tolist() == [[6.0, 6.0], [6.0, 6.0]]


class OwnAttention(nn.Module):
    """Attention weights by broadcasting and exp / sum: no call the rules can see."""

    def forward(self, x):
        w = (x[:, :, None] * x[:, None]).sum(-1).exp()
        return (w / w.sum(-1, keepdim=True)).sum(-1, keepdim=True) * x


def test_refusals_are_one_line():
    net = nn.Sequential(nn.Linear(8, 8), OwnAttention(), nn.Flatten(), nn.Linear(40, 2))
    with pytest.raises(ValueError, match=r"attnlrp cannot follow the attention of '1'") as e:
        lv.lrp(net, TOKENS, 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown composite 'attn'"):
        lv.lrp(Net(), TOKENS, 0, composite="attn")
    unnamed = Net()
    unnamed.blocks[0].attention.__class__ = type("Mixer", (SelfAttention,), {})  # no module named attention
    unnamed.blocks[1].attention.__class__ = type("Mixer", (SelfAttention,), {})
    with pytest.raises(ValueError, match=r"computes attention \(scaled_dot_product_attention\), which the "
                                         "convolutional composites do not cover: use composite='attnlrp'"):
        lv.lrp(unnamed, TOKENS, 0)


def zoo():
    import timm
    import torchvision
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    tv_vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)
    nn.init.normal_(tv_vit.heads.head.weight)  # torchvision's head starts at zeros: nothing to explain
    hf = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
              intermediate_size=32, num_labels=5)
    return {
        "torchvision-vit": tv_vit,
        "torchvision-swin": torchvision.models.swin_t(num_classes=5),
        "timm-vit": timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=2),
        "timm-deit": timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                                       num_classes=5, depth=2),
        "timm-swin": timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, num_classes=5,
                                       depths=(1, 1, 1, 1)),
        "hf-vit-sdpa": ViTForImageClassification(ViTConfig(**hf, attn_implementation="sdpa")),
        "hf-vit-eager": ViTForImageClassification(ViTConfig(**hf, attn_implementation="eager")),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attention_models_of_the_zoo():
    """Every family runs, batched == unbatched; timm's fused and explicit attention and Hugging Face's sdpa and
    eager attention give the same relevance."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    models = zoo()
    models["hf-vit-eager"].load_state_dict(models["hf-vit-sdpa"].state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps = {}
    for name, net in models.items():
        net.eval()
        xx = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) if name == "torchvision-swin" else x
        r = lv.lrp(net, xx, 1)
        assert r.method == "lrp-attnlrp" and r.maps.shape == xx.shape and r.maps.abs().sum() > 0, name
        one = lv.lrp(net, xx[1:], 1)
        torch.testing.assert_close(one.maps[0], r.maps[1], rtol=1e-4, atol=1e-5 * float(r.maps.abs().max()))
        maps[name] = r.maps
    torch.testing.assert_close(maps["hf-vit-sdpa"], maps["hf-vit-eager"], rtol=1e-4, atol=1e-6)
    vit = models["timm-vit"]
    for block in vit.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(lv.lrp(vit, x, 1).maps, maps["timm-vit"], rtol=1e-4, atol=1e-6)


LXT = """
import sys, types, torch
stub = types.ModuleType("lxt.efficient.models.bert")  # lxt 2.1's BERT module does not import under transformers 5
stub.modeling_bert, stub.attnLRP = types.ModuleType("modeling_bert"), {}
sys.modules["lxt.efficient.models.bert"] = stub
from lxt.efficient import monkey_patch
which, out = sys.argv[1], sys.argv[2]
from test_attnlrp import lxt_model
if which == "torchvision-vit":
    from torchvision.models import vision_transformer as mod
    monkey_patch(mod)  # lxt's default map for it: CP-LRP
else:  # its GPT-2 AttnLRP map; the attention wrapper set on the module's eager function itself (transformers 5
    # looks attention functions up through an interface lxt 2.1 replaces by a plain dict)
    import lxt.efficient.models.gpt2 as lg
    from lxt.efficient.patches import wrap_attention_forward
    from transformers.models.gpt2 import modeling_gpt2 as mod
    monkey_patch(mod, {k: v for k, v in lg.attnLRP.items() if k is not mod})
    mod.eager_attention_forward = wrap_attention_forward(mod.eager_attention_forward)
net, x = lxt_model(which)
x = x.clone().requires_grad_(True)
net(x)[:, 1].sum().backward()
torch.save((x * x.grad).detach(), out)
"""


def lxt_model(which):
    """The model and inputs both sides explain: a small torchvision ViT (its head drawn, not zeros) or GPT-2 on
    token embeddings, the last token's features to 5 classes."""
    torch.manual_seed(0)
    if which == "torchvision-vit":
        import torchvision

        net = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)
        nn.init.normal_(net.heads.head.weight)  # torchvision's head starts at zeros: nothing to explain
        return net.eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    from transformers import GPT2Config, GPT2Model

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.core = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=11,
                                             attn_implementation="eager"))
            self.head = nn.Linear(16, 5)

        def forward(self, embeddings):
            return self.head(self.core(inputs_embeds=embeddings).last_hidden_state[:, -1])

    return LastToken().eval(), torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.skipif(importlib.util.find_spec("lxt") is None, reason="lxt 2.1 is not installed")
@pytest.mark.parametrize("which,composite", [("torchvision-vit", "cp-lrp"), ("gpt2", "attnlrp")])
def test_equals_lxt(which, composite, tmp_path):
    """lxt patches classes of torch and transformers for the whole process: it runs in its own."""
    pytest.importorskip("transformers")
    out = tmp_path / "lxt.pt"
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    done = subprocess.run([sys.executable, "-c", LXT, which, str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(out)
    net, x = lxt_model(which)
    ours = lv.lrp(net, x, 1, composite=composite, epsilon=0.0).maps
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
