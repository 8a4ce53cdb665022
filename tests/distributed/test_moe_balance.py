"""MoE load balancing (longtrain/optim/balance.py): the balancing loss at each scope, the router
z-loss and bias balancing, against explicit formulas, transformers, and single-process training.

Layouts run the real Trainer in spawned gloo processes (the job runner of tests/support/harness.py)
on the tiny MoE model with a large balancing coefficient (0.1) and a z-loss (0.01), so a wrong count,
scale or scope moves the router's gradient by far more than the tolerance. Tolerance: fp32 on CPU, the
layouts change only the summation order: support/parity.py's error model (the first step at 1e-5 on
scalars and 1e-4, atol 1e-6, on gradients; later steps at 1e-4, where AdamW amplifies the reordering:
one AVX-512 machine measured 1.04e-5 on the gradient norm at step 3). The planted errors of
test_planted_errors_fail show what the tolerances still catch.
"""
from __future__ import annotations

import copy

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from longtrain.config import BalanceConfig, ConfigError, MoETrainConfig
from longtrain.models.moe import MoE
from support.harness import run_jobs
from support.helpers import common, moe_args, perturb, train_in_process
from support.parity import assert_same_curve, assert_same_step1, assert_scalar, step_rtol

MOE = ["model.name=tiny_moe", "moe.balance.coef=0.1", "moe.z_loss_coef=0.01", "logging.expert_frac_every=1"]
DOMAINS = ["data.source=domains", "data.domains.num_train=48", "data.domains.num_eval=8", "trainer.eval_every=3",
           "trainer.eval_rows=8"]
GLOBAL, MICRO, SEQUENCE = ("moe.balance.scope=global",), ("moe.balance.scope=micro_batch",), \
    ("moe.balance.scope=sequence",)


# ------------------------------------------------------------------ the block's injected gradients
def test_injected_gradients_equal_the_explicit_losses_fp64():
    """The block adds ``aux_weights`` x d(per-row probability sums) and ``z_weight`` x d(sum of lse^2)
    to its backward: the same gradients as back-propagating those terms explicitly (fp64, 1e-10)."""
    torch.manual_seed(0)
    block = MoE(moe_args(num_shared_experts=1)).double()
    perturb(block)
    ref = copy.deepcopy(block)
    x = torch.randn(2, 24, 64, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 24, 64, dtype=torch.float64)
    w_be, w_z = torch.rand(2, 6, dtype=torch.float64), 0.37
    block.aux_grad, block.z_weight = True, w_z
    out = block(x)
    block.aux_weights = w_be  # set after the forward, as the balancer does
    out.backward(g)
    assert block.last_routing.lse_sq_sum is not None

    out_ref = ref(x_ref)
    logits = F.linear(x_ref, ref.gate.weight)
    explicit = (out_ref * g).sum() + (w_be * logits.softmax(-1).sum(1)).sum() + \
        w_z * torch.logsumexp(logits, -1).square().sum()
    explicit.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(block.gate.weight.grad, torch.autograd.grad(  # the terms matter
        (ref(x_ref) * g).sum(), ref.gate.weight)[0])


def test_backward_without_weights_is_an_error():
    block = MoE(moe_args()).double()
    block.aux_grad = True
    out = block(torch.randn(1, 8, 64, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuntimeError, match="aux_weights"):
        out.sum().backward()


def test_expert_bias_changes_the_choice_not_the_weights():
    torch.manual_seed(0)
    block = MoE(moe_args(norm_topk_prob=False)).double()
    perturb(block)
    x = torch.randn(1, 30, 64, dtype=torch.float64)
    block(x)
    free = block.last_routing
    block.expert_bias = torch.tensor([10.0, 10.0, 0, 0, 0, 0], dtype=torch.float64)  # force experts 0 and 1
    out = block(x)
    assert torch.equal(block.last_routing.experts.sort(-1).values, torch.tensor([[0, 1]] * 30))
    assert not torch.equal(free.experts.sort(-1).values, block.last_routing.experts.sort(-1).values)
    # the weights are the unbiased probabilities of the forced experts
    probs = F.linear(x[0], block.gate.weight).softmax(-1)
    biased = torch.zeros_like(x[0])
    for e in (0, 1):
        gate, up = (x[0] @ block.experts.gate_up_proj[e].t()).chunk(2, -1)
        biased += probs[:, e:e + 1] * ((F.silu(gate) * up) @ block.experts.down_proj[e].t())
    torch.testing.assert_close(out[0], biased, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ transformers parity
def test_micro_batch_loss_and_gradients_match_transformers(tmp_path):
    """One MoE layer, one micro-batch: loss = CE + coef x LBL and every gradient equal transformers'
    Mixtral with ``output_router_logits`` (its load_balancing_loss_func) in fp32."""
    transformers = pytest.importorskip("transformers")
    from longtrain.models import from_hf
    from longtrain.optim.balance import Balancer
    from longtrain.optim.loss import chunked_lm_loss
    from longtrain.parallel.dims import ParallelDims

    coef = 0.3
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4,
                                        num_experts_per_tok=2, num_hidden_layers=1, router_aux_loss_coef=coef,
                                        output_router_logits=True)
    config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(config)
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    out = hf(ids, labels=ids)
    out.loss.backward()

    dims = ParallelDims(world_size=1, ulysses=1, ring=1)
    dims.build_groups()
    losses = {}
    for c in (coef, 0.0):  # coef 0: the balancing term is what makes the gradients agree
        ours = from_hf(tmp_path / "hf")
        balancer = Balancer(ours, MoETrainConfig(balance=BalanceConfig(scope="micro_batch", coef=c)), dims,
                            micro_batch_size=2, grad_accum=1, seq_len=40)
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        weights = (labels != -100).float() / (labels != -100).sum()
        ce = chunked_lm_loss(ours.hidden_states(ids), ours.output_weight, labels, weights, 4096)
        balancer.after_forward()
        ce.backward()
        metrics = balancer.end_step()
        losses[c] = (float(ce.detach()) + metrics["aux_loss"], metrics["moe/lbl"], ours)
    loss, lbl, ours = losses[coef]
    assert loss == pytest.approx(out.loss.item(), rel=1e-6)
    assert lbl == pytest.approx(out.aux_loss.item(), rel=1e-6)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    gate = "model.layers.0.mlp.gate.weight"
    without = dict(losses[0.0][2].named_parameters())[gate].grad
    assert (without - hf_params[gate].grad).abs().max() > 1e-3 * hf_params[gate].grad.abs().max()


# ------------------------------------------------------------------ trainer: scopes and layouts
def _jobs(tmp, specs):
    return [(name, common(tmp, name) + MOE + DOMAINS + list(extra) + ["checkpoint.save_final=false"], {"grads": True})
            for name, extra in specs.items()]


def _same(got, ref):
    """The first step's loss and gradients, every step's losses and balancing metrics (support/parity.py's
    tolerance of that step), the expert loads (fractions of token counts: equal unless a routing choice
    flips) and the evaluation after step 3."""
    assert_same_step1(got, ref)
    assert_same_curve(got["metrics"], ref["metrics"],
                      keys=("loss", "grad_norm", "aux_loss", "moe/lbl", "moe/z_loss", "moe/maxvio"))
    for a, b in zip(got["metrics"], ref["metrics"]):
        for key in (k for k in b if k.endswith("expert_frac")):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert_scalar(x, y, 1e-4, key, b["step"], atol=1e-6)
    evals = [m for m in ref["metrics"] if "eval_loss" in m]
    assert evals and "eval_moe_specialisation/dna" in evals[-1]
    for a, b in zip([m for m in got["metrics"] if "eval_loss" in m], evals):
        for key in (k for k in b if k.startswith("eval_")):  # expert load by domain: whole-sequence counts
            assert_scalar(a[key], b[key], step_rtol(b["step"]), key, b["step"])


def _plant_double_gradient(trainer):
    """Planted error: every rank back-propagates twice its loss (a gradient scaled by 2)."""
    backward = trainer.engine.backward
    trainer.engine.backward = lambda loss: backward(2 * loss)


def _plant_adam_restart(trainer):
    """Planted error: AdamW's moments are dropped before every step after the first (as a lost
    optimizer state would): step 1 is untouched, steps 2 and 3 move."""
    optimizer, calls = trainer.engine.optimizer, []
    step = optimizer.step

    def restarting_step(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            optimizer.state.clear()
        return step(*args, **kwargs)
    optimizer.step = restarting_step


def _router_grads_differ(a, b) -> bool:
    return any((a["grads"][n] - b["grads"][n]).abs().max() > 1e-3 * b["grads"][n].abs().max()
               for n in b["grads"] if n.endswith("mlp.gate.weight"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the whole global batch of 4 sequences in one micro-batch, per scope; plus
    activation checkpointing, StreamBP and 2-step accumulation under global scope."""
    tmp = tmp_path_factory.mktemp("balance")
    mbs4 = ("data.micro_batch_size=4",)
    return tmp, run_jobs(1, _jobs(tmp, {
        "global": mbs4 + GLOBAL, "micro": mbs4 + MICRO, "sequence": mbs4 + SEQUENCE,
        "ckpt": mbs4 + GLOBAL + ("memory.checkpointing=true",),
        "streambp": mbs4 + GLOBAL + ("memory.streambp.enabled=true", "memory.streambp.chunk_size=48"),
        "accum2": ("data.micro_batch_size=2", "trainer.grad_accum=2") + GLOBAL,
    }))


def test_one_rank_without_accumulation_global_equals_micro_batch(single):
    _, r = single
    _same(r["micro"], r["global"])
    assert r["global"]["metrics"][0]["aux_loss"] > 0.1 * 2 * 0.5  # coef x LBL, LBL >= top_k x ~balance
    assert _router_grads_differ(r["sequence"], r["global"])  # a sequence is not the batch


def test_recomputation_counts_once(single):
    """Activation checkpointing and StreamBP recompute the MoE blocks in the backward: the counts,
    losses and gradients stay those of one forward."""
    _, r = single
    _same(r["ckpt"], r["global"])
    _same(r["streambp"], r["global"])


def test_accumulation_uses_running_totals(single):
    """Two micro-batches of 2: micro-batch 2 balances against the counts of both (running totals),
    micro-batch 1 against its own; the step's LBL is their mean, not the global batch's LBL."""
    _, r = single
    acc, whole = r["accum2"]["metrics"][0], r["global"]["metrics"][0]
    assert acc["loss"] == pytest.approx(whole["loss"], rel=1e-5)  # the same cross-entropy
    assert acc["moe/lbl"] != pytest.approx(whole["moe/lbl"], rel=1e-6)  # the same data, other groups
    assert acc["moe/layer0/expert_frac"] == pytest.approx(whole["moe/layer0/expert_frac"], rel=1e-5, abs=1e-7)


def test_running_totals_formula():
    """The balancer's LBL under accumulation equals the documented formula computed by hand."""
    from longtrain.optim.balance import Balancer
    from longtrain.parallel.dims import ParallelDims
    from longtrain.models import Transformer

    torch.manual_seed(0)
    model = Transformer(moe_args(num_layers=1)).double()
    model.init_weights()
    perturb(model)
    dims = ParallelDims(world_size=1, ulysses=1, ring=1)
    dims.build_groups()
    balancer = Balancer(model, MoETrainConfig(balance=BalanceConfig(scope="global", coef=1.0)), dims,
                        micro_batch_size=2, grad_accum=3, seq_len=10)
    balancer.begin_step()
    counts, probs, want = torch.zeros(6, dtype=torch.float64), [], 0.0
    for j in range(3):
        ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(j))
        with torch.no_grad():
            model.hidden_states(ids)
        routing = model.layers[0].mlp.last_routing
        balancer.after_forward()
        counts += routing.row_counts.sum(0).double()
        p = routing.prob_sums.sum(0) / 20
        want += 6 * ((counts / (20 * (j + 1))) * p).sum().item() / 3
    got = balancer.end_step()
    assert got["moe/lbl"] == pytest.approx(want, rel=1e-12)
    assert got["moe/layer0/expert_frac"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)


@pytest.fixture(scope="module")
def layouts(single):
    """The two-rank layouts of the global batch, and two planted errors on dp 2."""
    tmp, _ = single
    planted = {"dp2-grad-x2": _plant_double_gradient, "dp2-adam-restart": _plant_adam_restart}
    jobs = [(name, common(tmp, name) + MOE + DOMAINS + ["data.micro_batch_size=2", *GLOBAL,
                                                          "checkpoint.save_final=false"], {"grads": True, "setup": fn})
            for name, fn in planted.items()]
    return run_jobs(2, jobs + _jobs(tmp, {
        "dp2": ("data.micro_batch_size=2",) + GLOBAL,
        "dp2-micro": ("data.micro_batch_size=2",) + MICRO,
        "dp2-sequence": ("data.micro_batch_size=2",) + SEQUENCE,
        "u2": ("data.micro_batch_size=4", "parallel.sp.ulysses=2") + GLOBAL,
        "r2": ("data.micro_batch_size=4", "parallel.sp.ring=2") + GLOBAL,
        "dp2-accum2": ("data.micro_batch_size=1", "trainer.grad_accum=2") + GLOBAL,
        "dp2-zero2": ("data.micro_batch_size=2", "zero.stage=2") + GLOBAL,
        "dp2-zero3": ("data.micro_batch_size=2", "zero.stage=3") + GLOBAL,
        "u2-streambp": ("data.micro_batch_size=4", "parallel.sp.ulysses=2", "memory.streambp.enabled=true",
                        "memory.streambp.chunk_size=48") + GLOBAL,
    }))


@pytest.mark.parity
def test_layouts_match_single_process(single, layouts):
    """Global scope: dp 2, Ulysses 2, ring 2 and dp 2 with accumulation equal one process on the same
    global batch (loss, gradients, aux losses, loads, eval load by domain); so do ZeRO-2 and ZeRO-3 on
    dp 2 and StreamBP under Ulysses 2 (chunks of the local shard). Sequence scope is layout
    independent. Micro-batch scope on dp 2 gives another loss and other router gradients."""
    _, r = single
    dist = layouts
    for name in ("dp2", "u2", "r2", "dp2-zero2", "dp2-zero3", "u2-streambp"):
        _same(dist[name], r["global"])
    _same(dist["dp2-accum2"], r["accum2"])
    _same(dist["dp2-sequence"], r["sequence"])
    micro = dist["dp2-micro"]
    assert micro["loss"] == pytest.approx(r["global"]["loss"], rel=1e-5)  # the same cross-entropy
    assert micro["metrics"][0]["moe/lbl"] > r["global"]["metrics"][0]["moe/lbl"] * (1 + 1e-4)
    assert _router_grads_differ(micro, r["global"])


@pytest.mark.parity
def test_planted_errors_fail(single, layouts):
    """The comparison of test_layouts_match_single_process fails on planted errors: a wrong balancing
    scope and a gradient scaled by 2 at the first step, lost Adam moments (which leave step 1 exact)
    at the later steps, so the later steps' wider tolerance still tests something."""
    ref = single[1]["global"]
    for name in ("dp2-micro", "dp2-grad-x2"):
        with pytest.raises(AssertionError):
            assert_same_step1(layouts[name], ref, name)
    restarted = layouts["dp2-adam-restart"]
    assert_same_step1(restarted, ref)
    assert_same_curve(restarted["metrics"][:1], ref["metrics"][:1], keys=("loss", "grad_norm", "moe/lbl"))
    with pytest.raises(AssertionError):
        assert_same_curve(restarted["metrics"], ref["metrics"], keys=("loss", "grad_norm", "moe/lbl"))
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(restarted["metrics"][1:], ref["metrics"][1:])
                for k in ("loss", "grad_norm", "moe/lbl"))
    assert worst > 10 * step_rtol(2), worst  # not at the edge of the tolerance: far past it


# ------------------------------------------------------------------ bias balancing and resume
def test_bias_moves_towards_balance_and_survives_resume(tmp_path):
    base = MOE + ["moe.balance.coef=0", "moe.balance.bias_update_rate=0.01", "trainer.max_steps=4"]
    straight = train_in_process(tmp_path, "straight", base)
    first = train_in_process(tmp_path, "resumed", base + ["trainer.stop_at_step=2", "checkpoint.every=2"])
    resumed = train_in_process(tmp_path, "resumed", base + ["checkpoint.resume=auto"])  # steps 1-2 kept
    assert [m["step"] for m in first] == [1, 2] and [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):  # the bias changes routing: a lost bias changes maxvio
        for key in ("loss", "grad_norm", "moe/maxvio"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
    bias = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000004" / "moe_balance.pt")["bias"]
    # every update is +-rate by the sign of (mean load - load): after 4 steps a multiple of 0.01
    assert bias.abs().max() > 0 and torch.allclose(bias * 100, (bias * 100).round(), atol=1e-4)
    step1 = straight[0]
    no_bias = train_in_process(tmp_path, "nobias", MOE + ["moe.balance.coef=0", "trainer.max_steps=1"])[0]
    assert no_bias["moe/maxvio"] == pytest.approx(step1["moe/maxvio"])  # the bias starts at 0


def test_bias_update_rule():
    from longtrain.optim.balance import Balancer
    from longtrain.parallel.dims import ParallelDims
    from longtrain.models import Transformer

    torch.manual_seed(0)
    model = Transformer(moe_args(num_layers=2))
    model.init_weights()
    perturb(model)
    dims = ParallelDims(world_size=1, ulysses=1, ring=1)
    dims.build_groups()
    balancer = Balancer(model, MoETrainConfig(balance=BalanceConfig(coef=0.0, bias_update_rate=0.5)), dims,
                        micro_batch_size=1, grad_accum=1, seq_len=30)
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(0)))
    counts = torch.stack([b.last_routing.row_counts[0] for b in balancer.blocks])
    balancer.after_forward()
    balancer.end_step()
    assert torch.equal(balancer.bias, torch.zeros(2, 6))  # moves only once the step is applied
    balancer.update_bias()
    want = 0.5 * torch.sign(counts.mean(1, keepdim=True) - counts)
    assert torch.equal(balancer.bias, want) and (want != 0).any()
    assert all(b.expert_bias is not None for b in balancer.blocks)
    state = balancer.state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        balancer.load_state_dict({"bias": torch.zeros(3, 6)})
    balancer.load_state_dict(state)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("override,key", [
    ("moe.balance.scope=batch", "moe.balance.scope"),
    ("moe.balance.coef=-1", "moe.balance.coef"),
    ("moe.z_loss_coef=-0.1", "moe.z_loss_coef"),
    ("moe.balance.bias_update_rate=-1", "moe.balance.bias_update_rate"),
])
def test_bad_balance_settings_name_the_key(override, key):
    from support.helpers import compose_cfg
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_cfg([override])


# ------------------------------------------------------------------ expert load by domain
def test_specialisation_is_the_top_k_share():
    from longtrain.trainer.moe_report import specialisation, summarise
    counts = np.zeros((3, 1, 4))
    counts[0, 0] = [10, 10, 10, 10]  # spread evenly: top-2 share 1/2
    counts[1, 0] = [0, 30, 30, 0]  # always the same two experts: 1
    # domain 2 has no tokens: NaN, left out of the means
    spec = specialisation(counts, top_k=2)
    assert spec[0, 0] == 0.5 and spec[1, 0] == 1.0 and np.isnan(spec[2, 0])
    out = summarise(counts, ["a", "b", "c"], top_k=2)
    assert out == {"moe_specialisation": 0.75, "moe_specialisation/a": 0.5, "moe_specialisation/b": 1.0}


def test_domain_counts_follow_each_token():
    from longtrain.trainer.moe_report import add_domain_counts
    torch.manual_seed(0)
    block = MoE(moe_args())
    with torch.no_grad():
        block(torch.randn(2, 5, 64))
    domains = torch.tensor([[0, 0, 1, 1, -1], [1, 1, 1, 0, -1]])
    counts = torch.zeros(2, 1, 6, dtype=torch.float64)
    add_domain_counts(counts, [block], domains)
    experts = block.last_routing.experts.view(2, 5, 2)
    for d in (0, 1):
        want = torch.bincount(experts[domains == d].reshape(-1), minlength=6).double()
        assert torch.equal(counts[d, 0], want)
    assert counts.sum() == 8 * 2  # padding (-1) not counted


def test_eval_writes_the_heat_map(single):
    import json
    tmp, r = single
    plots = tmp / "global" / "plots"
    record = json.loads((plots / "expert_load_step0000003.json").read_text())
    assert (plots / "expert_load_step0000003.png").stat().st_size > 1000
    assert record["domains"] == ["arithmetic", "code", "dna", "prose"] and record["layers"] == [0, 1]
    counts = np.asarray(record["counts"])  # [domain, layer, expert]
    per_layer = counts.sum((0, 2))
    assert per_layer[0] == per_layer[1] > 0 and per_layer[0] % 2 == 0  # every token routed top-2 per layer
    metrics = r["global"]["metrics"][-1]
    assert metrics["eval_moe_specialisation"] == pytest.approx(np.mean(
        [v for row in record["specialisation"] for v in row if v is not None]))


def test_expert_frac_cadence(tmp_path):
    metrics = train_in_process(tmp_path, "cadence", MOE + ["logging.expert_frac_every=2", "trainer.max_steps=3"])
    has = [("moe/layer1/expert_frac" in m, "moe/layer1/maxvio" in m) for m in metrics]
    assert has == [(True, True), (True, True), (False, True)]  # first step, every 2nd; scalars always
