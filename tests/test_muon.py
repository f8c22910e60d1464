"""optim="muon" on one device: torch's Muon on the targeted hidden matrices, torch's AdamW on the rest, one optimizer
(lightning_optims/families/muon.py). The sharded layouts: tests/test_muon_sharded.py."""

from __future__ import annotations

import pytest
import torch

from lightning_optims import OptimizerArguments
from lightning_optims.build import create_optimizer
from lightning_optims.families.muon import MuonWithAdamW, newton_schulz
from lightning_optims.optim_args import OptimizerSettingError
from tests.helpers import LlamaModule, lightning_trainer, loader, tiny_llama

TORCH_MUON = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason=f"torch.optim.Muon is in torch >= 2.9 (installed: {torch.__version__})"
)
STEPS = 6
SETTINGS = dict(
    optim="muon",
    optim_target_modules="all-linear",
    learning_rate=2e-2,
    weight_decay=0.05,
    adam_beta1=0.85,
    adam_beta2=0.95,
    adam_epsilon=1e-7,
    optim_args="momentum=0.9,ns_steps=4,adjust_lr_fn=match_rms_adamw",
)


def by_hand(max_grad_norm: float) -> torch.nn.Module:
    """A user's loop without this package: torch.optim.Muon on the hidden linear weights, torch.optim.AdamW on the
    rest (the decay / no-decay split by name), the same batches, the global norm clipped as Lightning clips it."""
    model = tiny_llama()
    named = dict(model.named_parameters())
    hidden = [n for n in named if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    no_decay = [n for n in named if "norm" in n]
    decay = [n for n in named if n not in hidden and n not in no_decay]  # (the embedding and the head)
    muon = torch.optim.Muon(
        [named[n] for n in hidden], lr=2e-2, weight_decay=0.05, momentum=0.9, ns_steps=4, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [named[n] for n in decay], "weight_decay": 0.05},
            {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
        ],
        lr=2e-2,
        betas=(0.85, 0.95),
        eps=1e-7,
    )
    schedule = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: max(0.0, (STEPS - s) / STEPS)) for o in (muon, adamw)]
    for step, batch in enumerate(loader()):
        if step == STEPS:
            break
        model(**batch).loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        for optimizer in (muon, adamw):
            optimizer.step()
            optimizer.zero_grad()
        for s in schedule:
            s.step()
    return model


def ours(max_grad_norm: float) -> LlamaModule:
    module = LlamaModule(model=tiny_llama(), max_grad_norm=max_grad_norm, **SETTINGS)
    with pytest.warns(UserWarning, match="'model.lm_head.weight'.*stay on AdamW"):
        lightning_trainer(STEPS).fit(module, loader())
    return module


@TORCH_MUON
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_one_device_equals_torchs_muon_and_adamw_by_hand(max_grad_norm):
    """Through the mixin and a Trainer (the linear schedule, clipping, named groups) against torch's Muon and AdamW
    built by hand on the same model and batches: bit for bit without clipping; with it within 1e-6 (measured 1.1e-8:
    the global norm is summed in another order than torch's ``clip_grad_norm_``)."""
    mine, hand = ours(max_grad_norm).model.state_dict(), by_hand(max_grad_norm).state_dict()
    initial = tiny_llama().state_dict()
    for key in hand:
        if max_grad_norm:
            torch.testing.assert_close(mine[key], hand[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(mine[key], hand[key]), f"{key}: {(mine[key] - hand[key]).abs().max()}"
        assert not torch.equal(mine[key], initial[key]) or "rotary" in key, key


def test_groups_named_for_the_lr_monitor_and_targets_without_embedding_and_head():
    """Three groups, each named (Lightning's LearningRateMonitor logs lr-MuonWithAdamW/muon ...): the decay and
    no-decay groups of AdamW with the Trainer's AdamW settings, and the Muon group of the targeted hidden matrices;
    the head, matched by all-linear, stays on AdamW with a warning naming it."""
    model = tiny_llama()
    with pytest.warns(UserWarning, match="'lm_head.weight'"):
        optimizer = create_optimizer(model, OptimizerArguments(**SETTINGS))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["decay", "no_decay", "muon"]
    assert {names[id(p)] for p in groups["decay"]["params"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all("norm" in names[id(p)] for p in groups["no_decay"]["params"])
    assert len(groups["muon"]["params"]) == 14 and all(p.dim() == 2 for p in groups["muon"]["params"])
    assert groups["decay"]["weight_decay"] == groups["muon"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.85, 0.95) and optimizer.defaults["eps"] == 1e-7
    muon = groups["muon"]
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"], muon["adjust_lr_fn"]) == (
        0.9,
        True,
        4,
        "match_rms_adamw",
    )
    assert muon["ns_coefficients"] == (3.4445, -4.775, 2.0315) and muon["eps"] == 1e-7


def test_a_tied_head_is_the_embedding_and_stays_on_adamw():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        optimizer = create_optimizer(model, OptimizerArguments(optim="muon", optim_target_modules="all-linear"))
    muon = next(g for g in optimizer.param_groups if g["name"] == "muon")
    assert all(p is not model.model.embed_tokens.weight for p in muon["params"]) and len(muon["params"]) == 7


@pytest.mark.parametrize(
    ("optim_args", "message"),
    [
        ("ns_steps=100", "optim_args ns_steps=100 for muon: accepted values are 0 to 99"),
        ("momentum=-0.1", "optim_args momentum=-0.1 for muon: accepted values are 0 or more"),
        ("ns_coefficients=1:2", "ns_coefficients='1:2' for muon: expected 3 numbers"),
        ("ns_coefficients=1:x:2", "expected numbers separated by ':'"),
        ("adjust_lr_fn=rms", "accepted values are 'original', 'match_rms_adamw'"),
        ("rank=2", "unknown key 'rank' for muon; accepted: momentum, nesterov"),
    ],
)
def test_bad_settings_are_refused_naming_them(optim_args, message):
    with pytest.raises(OptimizerSettingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        args = OptimizerArguments(optim="muon", optim_target_modules="all-linear", optim_args=optim_args)
        create_optimizer(tiny_llama(), args)


def test_targets_that_are_only_the_head_are_refused():
    with pytest.raises(OptimizerSettingError, match="selects only the model's input embedding or output head"):
        create_optimizer(tiny_llama(), OptimizerArguments(optim="muon", optim_target_modules=["lm_head"]))


def test_ns_coefficients_from_a_yaml_list_and_from_a_string():
    for given in ("1.5:-2:0.5", [1.5, -2, 0.5]):
        args = OptimizerArguments(
            optim="muon", optim_target_modules="all-linear", optim_args={"ns_coefficients": given}
        )
        assert args.parsed_optim_args["ns_coefficients"] == (1.5, -2.0, 0.5)


@TORCH_MUON
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (16, 16)])
def test_newton_schulz_is_torchs_bit_for_bit(shape):
    """The iteration the owners run (also where torch has no Muon, before 2.9) is torch's, bit for bit, tall, wide
    and square, on float32 and bfloat16 input."""
    from torch.optim._muon import _zeropower_via_newtonschulz  # (the test's reference only)

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        matrix = torch.randn(shape, generator=g).to(dtype)
        expected = _zeropower_via_newtonschulz(matrix.clone(), (3.4445, -4.775, 2.0315), 5, 1e-7)
        assert torch.equal(newton_schulz(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7), expected)


@TORCH_MUON
def test_a_bfloat16_parameter_without_nesterov_keeps_its_momentum():
    """torch's Muon divides a bfloat16 input in place: for a bfloat16 parameter with nesterov=False that input is the
    momentum buffer, which its next step starts from divided by its norm. Ours leaves the buffer the average of the
    gradients (the algorithm's B_t); torch's ends elsewhere."""
    weight = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    grads = [torch.randn(16, 8, dtype=torch.bfloat16) for _ in range(2)]
    ours_ = MuonWithAdamW([{"params": [weight], "muon": True, **_muon_options(nesterov=False)}], lr=1e-2)
    theirs = torch.optim.Muon([torch.nn.Parameter(weight.detach().clone())], lr=1e-2, nesterov=False)
    for grad in grads:
        for optimizer in (ours_, theirs):
            for p in optimizer.param_groups[0]["params"]:
                p.grad = grad.clone()
            optimizer.step()
    expected = torch.zeros_like(grads[0]).lerp_(grads[0], 0.05).lerp_(grads[1], 0.05)  # (B_t, momentum 0.95)
    assert torch.equal(ours_.state[weight]["momentum_buffer"], expected)
    (other,) = theirs.param_groups[0]["params"]
    assert not torch.equal(theirs.state[other]["momentum_buffer"], expected)


def _muon_options(**overrides):
    options = dict(
        momentum=0.95, nesterov=True, ns_steps=5, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7,
        adjust_lr_fn="original", weight_decay=0.1,
    )  # fmt: skip
    options.update(overrides)
    return options


def test_a_muon_group_takes_matrices_only():
    with pytest.raises(ValueError, match=r"Muon steps 2-D parameters only; its group holds parameters of shape \(4,\)"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True, **_muon_options()}])
