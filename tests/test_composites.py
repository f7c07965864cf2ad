"""Composites (docs/spec.md §5–8): Lookahead, SAM, NeuroOptima, Muon.

Each is compared over >= 7 steps with an independent for-loop reference of the docs/spec.md rule written here
(not the library's own functions), on a small model with real forward/backward closures, on params and
every state tensor; state_dict round trips go through torch.save/torch.load and must resume bit-exactly.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from spec_checks import assert_lowp_close, make_params, roundtrip
from torch import nn

from fused_optim import (
    SAM,
    Adan,
    Lion,
    Lookahead,
    Muon,
    MuonWithAuxAdam,
    NeuroOptima,
    create_optimizer,
    muon_param_groups,
)
from fused_optim.muon import _foreach_muon, _forloop_muon, zeropower_via_newtonschulz5


# ----------------------------------------------------------------------------------------- fixtures
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 2))


def make_data(seed: int = 1, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    return x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 2, generator=g)


def batch(step: int, data):
    x, y = data
    idx = torch.arange(8) + (8 * step) % len(x)
    return x[idx % len(x)], y[idx % len(x)]


def closure_for(model, opt_or_params, xb, yb, counter: list | None = None, zero: bool = True):
    def closure():
        if counter is not None:
            counter.append(1)
        if zero:
            if isinstance(opt_or_params, torch.optim.Optimizer):
                opt_or_params.zero_grad()
            else:
                for p in opt_or_params:
                    p.grad = None
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        return loss
    return closure


def assert_same(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"


def assert_models_equal(m1, m2, what="params"):
    for i, (p, q) in enumerate(zip(m1.parameters(), m2.parameters())):
        assert_same(p.detach(), q.detach(), f"{what}[{i}]")


def assert_states_equal(opt1, params1, opt2, params2, what="state"):
    for i, (p, q) in enumerate(zip(params1, params2)):
        s1, s2 = opt1.state.get(p, {}), opt2.state.get(q, {})
        assert sorted(s1) == sorted(s2), f"{what}[{i}] keys {sorted(s1)} != {sorted(s2)}"
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert_same(s1[k], s2[k], f"{what}[{i}].{k}")
            else:
                assert s1[k] == s2[k], f"{what}[{i}].{k}"


# ----------------------------------------------------------------------------------------- Lookahead
INNERS = {
    "lion-forloop": lambda ps: Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, impl="forloop"),
    "adan-foreach": lambda ps: Adan(ps, lr=1e-2, weight_decay=0.02, impl="foreach"),
    "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False),
}


@pytest.mark.parametrize("impl", [None, "forloop", "foreach"])
@pytest.mark.parametrize("inner", sorted(INNERS))
def test_lookahead_matches_reference(inner, impl):
    data = make_data()
    model, ref_model = make_model(), make_model()
    opt = Lookahead(INNERS[inner](list(model.parameters())), k=3, alpha=0.4, impl=impl)
    ref_params = list(ref_model.parameters())
    ref_inner = INNERS[inner](ref_params)
    slow = None
    for step in range(1, 11):
        xb, yb = batch(step, data)
        loss = opt.step(closure_for(model, opt, xb, yb))
        # reference: docs/spec.md §5 literally, slow weights captured at the start of the first step
        if slow is None:
            slow = [p.detach().clone() for p in ref_params]
        ref_loss = ref_inner.step(closure_for(ref_model, ref_inner, xb, yb))
        if step % 3 == 0:
            with torch.no_grad():
                for p, s in zip(ref_params, slow):
                    p.mul_(0.4).add_(s, alpha=1 - 0.4)
                    s.copy_(p)
        assert_same(loss.detach(), ref_loss.detach(), f"loss@{step}")
        assert_models_equal(model, ref_model, f"params@{step}")
        assert_states_equal(opt.optimizer, list(model.parameters()), ref_inner, ref_params, f"state@{step}")
        for i, p in enumerate(model.parameters()):
            assert_same(opt._slow[p], slow[i], f"slow@{step}[{i}]")


def test_lookahead_shares_groups_and_state():
    model = make_model()
    inner = Lion(model.parameters(), lr=1e-3)
    opt = Lookahead(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": 5e-4})
    assert len(inner.param_groups) == 2
    assert isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(ValueError, match="Lookahead k"):
        Lookahead(Lion(make_model().parameters()), k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(Lion(make_model().parameters()), alpha=1.5)


def test_lookahead_slow_weights_captured_at_first_step_not_construction():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=2, alpha=0.5)
    loaded = make_model(seed=7)  # e.g. a checkpoint loaded after the optimizer was built
    model.load_state_dict(loaded.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = batch(0, make_data())
    opt.step(closure_for(model, opt, xb, yb))
    for p, b in zip(model.parameters(), before):
        assert_same(opt._slow[p], b)


@pytest.mark.parametrize("inner", ["adan-foreach", "torch-sgd"])
def test_lookahead_state_dict_roundtrip_resumes_bit_exactly(inner):
    data = make_data()
    model = make_model()
    opt = Lookahead(INNERS[inner](list(model.parameters())), k=3, alpha=0.5)
    for step in range(1, 5):  # stop between two syncs
        opt.step(closure_for(model, opt, *batch(step, data)))
    sd = roundtrip(opt.state_dict())
    assert set(sd) == {"state", "param_groups"}  # torch's layout: DCP's helpers keep exactly these
    assert sd["param_groups"][0]["lookahead_step"] == 4
    assert all("lookahead_slow" in sd["state"][i] for i in range(len(list(model.parameters()))))
    model2 = copy.deepcopy(model)
    opt2 = Lookahead(INNERS[inner](list(model2.parameters())), k=3, alpha=0.5)
    opt2.load_state_dict(sd)
    for step in range(5, 12):
        opt.step(closure_for(model, opt, *batch(step, data)))
        opt2.step(closure_for(model2, opt2, *batch(step, data)))
        assert_models_equal(model, model2, f"params@{step}")
    assert_states_equal(opt, list(model.parameters()), opt2, list(model2.parameters()))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert_same(opt._slow[p], opt2._slow[q], "slow")
        assert opt2._slow[q].data_ptr() != p.data_ptr()
    # a checkpoint of the bare inner optimizer loads too; slow weights are then captured at the next step
    opt3 = Lookahead(INNERS[inner](list(model2.parameters())), k=3, alpha=0.5)
    opt3.load_state_dict(roundtrip(opt.optimizer.state_dict()))
    assert opt3.lookahead_step == 0 and not opt3._slow


# ----------------------------------------------------------------------------------------- SAM
def _ref_sam_step(model, params, base, rho, adaptive, xb, yb):
    """davda54's SAM.step, literally, with a separate base optimizer and old params in a dict."""
    loss = closure_for(model, params, xb, yb)()
    with torch.no_grad():
        shared = params[0].device
        norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2).to(shared)
                                       for p in params if p.grad is not None]), p=2)
        scale = rho / (norm + 1e-12)
        old = {}
        for p in params:
            if p.grad is None:
                continue
            old[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)
    closure_for(model, params, xb, yb)()
    with torch.no_grad():
        for p, o in old.items():
            p.copy_(o)
    base.step()
    for p in params:
        p.grad = None
    return loss


SAM_BASES = {
    "torch-sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, foreach=False)),
    "adan-forloop": (Adan, dict(lr=1e-2, weight_decay=0.01, impl="forloop")),
    "adan-foreach": (Adan, dict(lr=1e-2, weight_decay=0.01, impl="foreach")),
}


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", sorted(SAM_BASES))
def test_sam_matches_reference(base, adaptive):
    cls, kw = SAM_BASES[base]
    rho = 0.5 if adaptive else 0.05
    data = make_data()
    model, ref_model = make_model(), make_model()
    opt = SAM(model.parameters(), cls, rho=rho, adaptive=adaptive, **kw)
    ref_params = list(ref_model.parameters())
    ref_base = cls(ref_params, **kw)
    for step in range(1, 9):
        xb, yb = batch(step, data)
        calls = []
        loss = opt.step(closure_for(model, opt, xb, yb, counter=calls))
        ref_loss = _ref_sam_step(ref_model, ref_params, ref_base, rho, adaptive, xb, yb)
        assert len(calls) == 2
        assert_same(loss.detach(), ref_loss.detach(), f"loss@{step}")
        assert_models_equal(model, ref_model, f"params@{step}")
        assert_states_equal(opt, list(model.parameters()), ref_base, ref_params, f"state@{step}")
        assert all(p.grad is None for p in model.parameters())


def test_sam_norm_stays_on_device(monkeypatch):
    model = make_model()
    opt = SAM(model.parameters(), Lion, rho=0.05, lr=1e-3, impl="foreach")
    closure_for(model, opt, *batch(0, make_data()))()

    def refuse(*_a, **_k):
        raise AssertionError("host sync in SAM.first_step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.first_step()
    monkeypatch.undo()
    assert opt._saved


def test_sam_restore_is_exact_and_uses_existing_grads():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    xb, yb = batch(0, make_data())
    closure_for(model, opt, xb, yb)()  # davda54's contract: the caller ran forward/backward first
    calls = []
    loss = opt.step(closure_for(model, opt, xb, yb, counter=calls))
    assert len(calls) == 1  # only the perturbed evaluation, whose loss step returns
    assert isinstance(loss, torch.Tensor)
    for p, b in zip(model.parameters(), before):
        assert_same(p.detach(), b, "restored")
    opt.step()  # no closure at lr=0 (torch.distributed.checkpoint's state initialisation): base step only
    for p, b in zip(model.parameters(), before):
        assert_same(p.detach(), b, "lr=0 step")
    opt.param_groups[0]["lr"] = 0.1
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_sam_state_dict_roundtrip_and_mid_step():
    data = make_data()
    model = make_model()
    opt = SAM(model.parameters(), Adan, rho=0.05, lr=1e-2)
    for step in range(1, 4):
        opt.step(closure_for(model, opt, *batch(step, data)))
    closure_for(model, opt, *batch(4, data))()
    opt.first_step(zero_grad=True)  # checkpoint taken at the perturbed point
    sd = roundtrip(opt.state_dict())
    assert all("sam_old_param" in sd["state"][i] for i in range(len(list(model.parameters()))))
    model2 = copy.deepcopy(model)
    opt2 = SAM(model2.parameters(), Adan, rho=0.05, lr=1e-2)
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (model2, opt2)):
        closure_for(m, o, *batch(4, data))()
        o.second_step(zero_grad=True)
    assert_models_equal(model, model2, "after mid-step resume")
    for step in range(5, 10):
        opt.step(closure_for(model, opt, *batch(step, data)))
        opt2.step(closure_for(model2, opt2, *batch(step, data)))
    assert_models_equal(model, model2)
    assert_states_equal(opt, list(model.parameters()), opt2, list(model2.parameters()))


# ----------------------------------------------------------------------------------------- NeuroOptima
def _ref_neuro_optima(model, xb, yb, st, *, lr, wd, rho, k, alpha, b1, b2, eps):
    """docs/spec.md §7 for one group: SAM (davda54 norm, non-adaptive), upstream's per-tensor core, Lookahead."""
    params = list(model.parameters())
    loss = closure_for(model, params, xb, yb)()
    with torch.no_grad():
        norm = torch.norm(torch.stack([(1.0 * p.grad).norm(p=2) for p in params]), p=2)
        scale = rho / (norm + 1e-12)
        old = [p.clone() for p in params]
        for p in params:
            p.add_(1.0 * p.grad * scale.to(p))
    closure_for(model, params, xb, yb)()
    with torch.no_grad():
        for p, o in zip(params, old):
            p.copy_(o)
        st["step"] += 1
        for p in params:
            s = st.setdefault(p, {})
            if not s:
                s.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                         exp_avg_diff=torch.zeros_like(p), prev_grad=torch.zeros_like(p), slow_param=p.clone())
            g = p.grad.add(p, alpha=wd)
            d = g - s["prev_grad"]
            s["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            s["exp_avg_diff"].mul_(b2).add_(d, alpha=1 - b2)
            s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            p.add_(torch.sign((s["exp_avg"] + b2 * s["exp_avg_diff"]) / (s["exp_avg_sq"].sqrt() + eps)),
                   alpha=-lr)
            s["prev_grad"].copy_(g)
        if st["step"] % k == 0:
            for p in params:
                p.mul_(alpha).add_(st[p]["slow_param"], alpha=1 - alpha)
                st[p]["slow_param"].copy_(p)
    for p in params:
        p.grad = None
    return loss


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_neuro_optima_matches_reference(impl):
    hp = dict(lr=1e-2, wd=0.01, rho=0.05, k=3, alpha=0.5, b1=0.9, b2=0.99, eps=1e-8)
    data = make_data()
    model, ref_model = make_model(), make_model()
    opt = NeuroOptima(model.parameters(), lr=hp["lr"], weight_decay=hp["wd"], sam_rho=hp["rho"],
                      lookahead_k=hp["k"], lookahead_alpha=hp["alpha"], betas=(hp["b1"], hp["b2"]),
                      eps=hp["eps"], impl=impl)
    st = {"step": 0}
    for step in range(1, 11):
        xb, yb = batch(step, data)
        loss = opt.step(closure_for(model, opt, xb, yb))
        ref_loss = _ref_neuro_optima(ref_model, xb, yb, st, **hp)
        assert_same(loss.detach(), ref_loss.detach(), f"loss@{step}")
        assert_models_equal(model, ref_model, f"params@{step}")
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert sorted(opt.state[p]) == sorted(st[q])
            for key in st[q]:
                assert_same(opt.state[p][key], st[q][key], f"{key}@{step}[{i}]")
        assert opt.param_groups[0]["step"] == step


def test_neuro_optima_seed_readme_usage_verbatim():
    """The seed's README loop, verbatim (only the import is ours), on a fixed synthetic task."""
    from fused_optim import NeuroOptima

    class YourModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    x_all, y_all = make_data(n=64)
    data_loader = [(x_all[i:i + 16], y_all[i:i + 16]) for i in range(0, 64, 16)]
    loss_fn = nn.MSELoss()

    def full_loss():
        with torch.no_grad():
            return loss_fn(model(x_all), y_all).item()

    model = YourModel()
    optimizer = NeuroOptima(
        model.parameters(),
        lr=1e-3,
        weight_decay=0.01,
        sam_rho=0.05,
        lookahead_k=5,
        lookahead_alpha=0.5,
        betas=(0.9, 0.999),
        eps=1e-8
    )
    start = full_loss()
    losses = []
    for _epoch in range(13):  # 52 steps
        for input, target in data_loader:
            def closure():
                optimizer.zero_grad()
                output = model(input)
                loss = loss_fn(output, target)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            losses.append(loss.item())
    assert len(losses) >= 50 and all(torch.isfinite(torch.tensor(losses)))
    end = full_loss()
    assert end < 0.9 * start, (start, end)  # lr=1e-3 sign steps: each weight moves <= 0.05 in 52 steps
    assert sum(losses[-8:]) < sum(losses[:8])


def test_neuro_optima_closure_without_zero_grad_and_sam_off():
    data = make_data()
    m1, m2 = make_model(), make_model()
    o1 = NeuroOptima(m1.parameters(), lr=1e-2, lookahead_k=2)
    o2 = NeuroOptima(m2.parameters(), lr=1e-2, lookahead_k=2)
    for step in range(1, 6):
        o1.step(closure_for(m1, o1, *batch(step, data)))
        o2.step(closure_for(m2, o2, *batch(step, data), zero=False))
    assert_models_equal(m1, m2)
    m3 = make_model()
    o3 = NeuroOptima(m3.parameters(), lr=1e-2, sam_rho=0.0)
    calls = []
    o3.step(closure_for(m3, o3, *batch(0, data), counter=calls))
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="closure"):
        NeuroOptima(make_model().parameters()).step()


def test_neuro_optima_core_foreach_matches_forloop_on_adversarial_shapes():
    """The core's functional impls alone, docs/spec.md §9 lists (0, 1, primes, block±1, non-contiguous)."""
    from fused_optim.neuro_optima import _foreach_neuro_optima, _forloop_neuro_optima

    p1 = [p.detach() for p in make_params(3)]
    p2 = [p.clone() for p in p1]
    states1 = [[torch.zeros_like(p) for p in p1] for _ in range(4)]
    states2 = [[torch.zeros_like(p) for p in p1] for _ in range(4)]
    g = torch.Generator().manual_seed(5)
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g) for p in p1]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1 * (step % 2), maximize=step == 5)
        _forloop_neuro_optima(p1, grads, *states1, **kw)
        _foreach_neuro_optima(p2, grads, *states2, **kw)
        for i, (a, b) in enumerate(zip(p1, p2)):
            assert_same(a, b, f"param{i}@{step}")
        for s1, s2 in zip(states1, states2):
            for a, b in zip(s1, s2):
                assert_same(a, b, f"state@{step}")


def test_neuro_optima_state_dict_roundtrip_resumes_bit_exactly():
    data = make_data()
    model = make_model()
    opt = NeuroOptima(model.parameters(), lr=1e-2, weight_decay=0.01, lookahead_k=5)
    for step in range(1, 4):
        opt.step(closure_for(model, opt, *batch(step, data)))
    sd = roundtrip(opt.state_dict())
    assert all("slow_param" in s and "prev_grad" in s for s in sd["state"].values())
    model2 = copy.deepcopy(model)
    opt2 = NeuroOptima(model2.parameters(), lr=1e-2, weight_decay=0.01, lookahead_k=5)
    opt2.load_state_dict(sd)
    for step in range(4, 12):  # crosses the syncs at steps 5 and 10
        opt.step(closure_for(model, opt, *batch(step, data)))
        opt2.step(closure_for(model2, opt2, *batch(step, data)))
        assert_models_equal(model, model2, f"params@{step}")
    assert_states_equal(opt, list(model.parameters()), opt2, list(model2.parameters()))


# ----------------------------------------------------------------------------------------- Muon
def _ref_muon_update(grad, momentum, beta, ns_steps, nesterov):
    """KellerJordan/Muon `muon_update` on a copy of the grad (upstream lerps into p.grad)."""
    grad = grad.clone()
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta) if nesterov else momentum
    if update.ndim == 4:
        update = update.view(len(update), -1)
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = update.bfloat16()
    if update.size(-2) > update.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(ns_steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if update.size(-2) > update.size(-1):
        X = X.mT
    X *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return X


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.hidden = nn.Linear(8 * 3 + 4 * 9, 16)
        self.hidden2 = nn.Linear(16, 24, bias=False)  # tall: Muon's max(1, rows/cols)**0.5 scale is > 1
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens, img):
        e = self.embed(tokens).flatten(1)
        c = self.conv(img).flatten(1)
        h = torch.relu(self.hidden(torch.cat([e, c], 1)))
        return self.head(self.norm(torch.relu(self.hidden2(h))))


def _tiny_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, 10, (8, 3), generator=g), torch.randn(8, 1, 3, 3, generator=g),
            torch.randint(0, 3, (8,), generator=g))


def _tiny_closure(model, opt, step):
    tokens, img, y = _tiny_batch(step)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens, img), y)
        loss.backward()
        return loss
    return closure


def test_muon_param_groups_split():
    model = TinyNet()
    muon, adam = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == ["conv.weight", "hidden.weight", "hidden2.weight"]
    assert sorted(names[id(p)] for p in adam["params"]) == ["conv.bias", "embed.weight", "head.bias",
                                                             "head.weight", "hidden.bias", "norm.bias",
                                                             "norm.weight"]
    assert muon["use_muon"] and not adam["use_muon"] and adam["lr"] == 3e-4 and adam["eps"] == 1e-10
    with pytest.raises(ValueError, match="1-D"):
        Muon(model.parameters())
    opt = create_optimizer(model, "muon", lr=0.01)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 3e-4 and opt.param_groups[1]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAuxAdam([{"params": list(model.parameters())}])


@pytest.mark.parametrize("impl,nesterov", [("forloop", True), ("forloop", False), ("foreach", True)])
def test_muon_matches_reference(impl, nesterov):
    model, ref = TinyNet(), TinyNet()
    opt = Muon(muon_param_groups(model, weight_decay=0.1, adam_weight_decay=0.01), nesterov=nesterov, impl=impl)
    ref_groups = muon_param_groups(ref, weight_decay=0.1, adam_weight_decay=0.01)
    ref_state: dict = {}
    for step in range(1, 9):
        opt.step(_tiny_closure(model, opt, step))
        grads_before = [p.grad.clone() for p in model.parameters()]
        for p in ref.parameters():
            p.grad = None
        nn.functional.cross_entropy(ref(*_tiny_batch(step)[:2]), _tiny_batch(step)[2]).backward()
        with torch.no_grad():
            for group in ref_groups:
                for p in group["params"]:
                    s = ref_state.setdefault(p, {})
                    lr, wd = group["lr"], group["weight_decay"]
                    if group["use_muon"]:
                        s.setdefault("momentum_buffer", torch.zeros_like(p))
                        u = _ref_muon_update(p.grad, s["momentum_buffer"], 0.95, 5, nesterov)
                        p.mul_(1 - lr * wd)
                        p.add_(u.reshape(p.shape), alpha=-lr)
                    else:  # upstream adam_update
                        if not s:
                            s.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=0)
                        s["step"] += 1
                        b1, b2 = group["betas"]
                        s["exp_avg"].lerp_(p.grad, 1 - b1)
                        s["exp_avg_sq"].lerp_(p.grad.square(), 1 - b2)
                        upd = (s["exp_avg"] / (1 - b1 ** s["step"])) / (
                            (s["exp_avg_sq"] / (1 - b2 ** s["step"])).sqrt() + group["eps"])
                        p.mul_(1 - lr * wd)
                        p.add_(upd, alpha=-lr)
        # upstream's int count; ours is stored as torch's Adam stores it, a 0-d float32 CPU tensor
        ref_view = {p: {k: torch.tensor(float(v)) if k == "step" else v for k, v in s.items()}
                    for p, s in ref_state.items()}
        assert_models_equal(model, ref, f"params@{step}")
        assert_states_equal(opt, list(model.parameters()), type("R", (), {"state": ref_view})(),
                            list(ref.parameters()), f"state@{step}")
        for p, g in zip(model.parameters(), grads_before):
            assert_same(p.grad, g, "p.grad must not be mutated")


def test_muon_foreach_batches_newton_schulz_like_forloop():
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 24), (16, 24), (24, 16), (0, 5), (4, 2, 3, 3), (16, 24)]
    p1 = [torch.randn(s, generator=g) for s in shapes]
    p2 = [p.clone() for p in p1]
    b1 = [torch.zeros_like(p) for p in p1]
    b2 = [torch.zeros_like(p) for p in p1]
    for step in range(7):
        grads = [torch.randn(s, generator=g) for s in shapes]
        kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, ns_steps=5, maximize=step == 3)
        _forloop_muon(p1, grads, b1, **kw)
        _foreach_muon(p2, grads, b2, **kw)
        for i, (a, b) in enumerate(zip(p1 + b1, p2 + b2)):
            # batched bf16 matmuls may round differently from single ones on other backends: docs/spec.md §8's
            # bf16 tolerance (the per-step update is lr*O(1), so compare the displacement scale)
            torch.testing.assert_close(a, b, rtol=1e-2, atol=0.02 * 1e-2, msg=f"tensor{i}@{step}")


@pytest.mark.parametrize("shape", [(32, 48), (64, 16), (3, 20, 20)])
def test_newton_schulz_singular_values_in_band(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g)
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # a prescribed spectrum across one decade: every direction lands in the band (orthogonalized)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    spectrum = torch.logspace(-1, 0, 24)
    H = u[:, :24] @ torch.diag(spectrum * 7.0) @ v.T
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(H, steps=5).float())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # and it points where U Vᵀ does
    uu, _, vh = torch.linalg.svd(H, full_matrices=False)
    cos = (zeropower_via_newtonschulz5(H, 5).float() * (uu @ vh)).sum() / (uu @ vh).norm() ** 2
    assert cos > 0.85


def test_muon_state_dict_roundtrip_resumes_bit_exactly():
    model = TinyNet()
    opt = Muon(model)
    for step in range(1, 3):
        opt.step(_tiny_closure(model, opt, step))
    sd = roundtrip(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = Muon(model2)
    opt2.load_state_dict(sd)
    for step in range(3, 8):
        opt.step(_tiny_closure(model, opt, step))
        opt2.step(_tiny_closure(model2, opt2, step))
    assert_models_equal(model, model2)
    assert_states_equal(opt, list(model.parameters()), opt2, list(model2.parameters()))


# ----------------------------------------------------------------------------------------- all composites
def _composites(model):
    return {
        "lookahead": lambda: Lookahead(Lion(model.parameters(), lr=1e-2), k=2),
        "sam": lambda: SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9),
        "neurooptima": lambda: NeuroOptima(model.parameters(), lr=1e-2),
        "muon": lambda: Muon(muon_param_groups(model, lr=0.02, adam_lr=1e-2)),
    }


@pytest.mark.parametrize("name", ["lookahead", "sam", "neurooptima", "muon"])
def test_lr_scheduler_drives_composites(name):
    model = make_model()
    opt = _composites(model)[name]()
    inner = getattr(opt, "_inner", opt)
    lrs0 = [g["lr"] for g in inner.param_groups]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = make_data()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for step in range(1, 4):
            opt.step(closure_for(model, opt, *batch(step, data)))
            sched.step()
    assert [g["lr"] for g in inner.param_groups] == [lr * 0.125 for lr in lrs0]
    # after a checkpoint load the scheduler still drives the live groups
    opt.load_state_dict(roundtrip(opt.state_dict()))
    sched.step()
    assert [g["lr"] for g in inner.param_groups] == [lr * 0.0625 for lr in lrs0]
    assert opt.param_groups is inner.param_groups


def test_create_optimizer_knows_composites():
    model = make_model()
    assert isinstance(create_optimizer(model, "neurooptima", lr=1e-3), NeuroOptima)
    assert isinstance(create_optimizer(model, "sam", base_optimizer="adamw", lr=1e-3), SAM)
    la = create_optimizer(model, "lookahead", base_optimizer="lion", k=4, lr=1e-4)
    assert isinstance(la, Lookahead) and isinstance(la.optimizer, Lion) and la.k == 4
    assert isinstance(create_optimizer(nn.Linear(4, 4, bias=False), "muon"), Muon)
    buf = io.BytesIO()
    torch.save(la.state_dict(), buf)


# ----------------------------------------------------------------------------------------- bf16 (docs/spec.md §9)
def _lowp_lockstep(step_fn, n_states: int, shapes, steps: int = 8, name: str = ""):
    """Run `step_fn(params, grads, states, step)` in float64, bf16 via forloop and bf16 via foreach on
    the same fresh draws; check docs/spec.md §9's low-precision rule on params and every state tensor."""
    base = [p.detach() for p in make_params(11, shapes=shapes)]
    runs = {}
    for key, dtype in (("hi", torch.float64), ("lo", torch.bfloat16), ("fe", torch.bfloat16)):
        ps = [p.to(dtype) for p in base]
        runs[key] = (ps, [[torch.zeros_like(p) for p in ps] for _ in range(n_states)])
    g = torch.Generator().manual_seed(12)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in base]
        for key, (ps, states) in runs.items():
            step_fn("foreach" if key == "fe" else "forloop", ps, [gr.to(ps[0].dtype) for gr in grads], states, step)
        (hp, hs), (lp, ls), (fp, fs) = runs["hi"], runs["lo"], runs["fe"]
        flat = [ps + [t for lst in states for t in lst] for ps, states in ((fp, fs), (lp, ls), (hp, hs))]
        for i, (a, lo, hi) in enumerate(zip(*flat)):
            assert_lowp_close(a, lo, hi, f"{name} tensor{i}@{step}")


def test_bf16_foreach_parts_follow_spec9_rule():
    from fused_optim.lookahead import _sync_impls
    from fused_optim.neuro_optima import NeuroOptima as NO
    from fused_optim.sam import _impls as sam_impls

    shapes = [(0,), (1,), (7,), (13, 17), (129,)]

    def neuro(impl, ps, grads, states, step):
        NO._impls[impl](ps, grads, *states, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01,
                        maximize=False)

    _lowp_lockstep(neuro, 4, shapes, name="neuro_optima")

    def lookahead(impl, ps, grads, states, step):
        slows = states[0]
        if step == 0:
            for s, p in zip(slows, ps):
                s.copy_(p)
        for p, gr in zip(ps, grads):
            p.sub_(0.1 * gr)
        if step % 2 == 1:
            _sync_impls[impl](ps, slows, alpha=0.3)

    _lowp_lockstep(lookahead, 1, shapes, name="lookahead")

    def sam(impl, ps, grads, states, step):
        norms = sam_impls[impl].norms(ps, grads, adaptive=step % 2 == 1)
        scale = 0.05 / (torch.norm(norms, p=2) + 1e-12)
        sam_impls[impl].perturb(ps, grads, states[0], scale=scale, adaptive=step % 2 == 1)
        if step % 3 == 2:
            sam_impls[impl].restore(ps, states[0])

    _lowp_lockstep(sam, 1, shapes, name="sam")

    def muon(impl, ps, grads, states, step):
        mats = [i for i, p in enumerate(ps) if p.ndim == 2]
        Muon._impls[impl]([ps[i] for i in mats], [grads[i] for i in mats], [states[0][i] for i in mats],
                          lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, ns_steps=5, maximize=False)

    _lowp_lockstep(muon, 1, [(13, 17), (17, 13), (13, 17), (1, 5)], name="muon")


# ----------------------------------------------------------------------------------------- Triton core
def _triton_or_skip():
    pytest.importorskip("triton")
    from fused_optim.kernels.neuro_optima import _triton_neuro_optima
    return _triton_neuro_optima


def test_neuro_optima_triton_core_matches_forloop():
    """The Triton core (interpreted on CPU) against the reference, docs/spec.md §9: per step from the same
    inputs, states within 4 ulp of their scale (the kernel's fused multiply-adds round once where the
    interpreter's emulation and torch's separate ops may round twice), params exact except sign flips
    where ``|exp_avg + b2·exp_avg_diff|`` is within 8 ulp of its operands."""
    from fused_optim.neuro_optima import _forloop_neuro_optima
    tri = _triton_or_skip()
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 1023, 1024, 1025, 2049]
    ref_p = [torch.randn(n, generator=g) for n in sizes] + [torch.randn(9, 12, generator=g).t()]
    ref_s = [[torch.randn(p.shape, generator=g).abs() if k == 1 else torch.randn(p.shape, generator=g) * 0.1
              for p in ref_p] for k in range(4)]
    eps32 = torch.finfo(torch.float32).eps
    b1, b2 = 0.9, 0.99
    for step in range(8):
        tri_p = [torch.empty_strided(p.shape, p.stride()).copy_(p) for p in ref_p]
        tri_s = [[s.clone() for s in lst] for lst in ref_s]
        grads = [torch.randn(p.shape, generator=g) for p in ref_p]
        kw = dict(lr=1e-2, beta1=b1, beta2=b2, eps=1e-8, weight_decay=0.1 * (step % 2), maximize=step == 4)
        _forloop_neuro_optima(ref_p, grads, *ref_s, **kw)
        tri(tri_p, grads, *tri_s, **kw)
        for k, (rl, tl_) in enumerate(zip(ref_s, tri_s)):
            for i, (r, t) in enumerate(zip(rl, tl_)):
                if r.numel():
                    tol = 4 * eps32 * (r.abs() + r.abs().mean())
                    assert ((t - r).abs() <= tol).all(), f"state{k}[{i}]@{step}"
        for i, (r, t) in enumerate(zip(ref_p, tri_p)):
            if not r.numel():
                continue
            c = ref_s[0][i] + b2 * ref_s[2][i]
            near_zero = c.abs() <= 8 * eps32 * (ref_s[0][i].abs() + (b2 * ref_s[2][i]).abs())
            bad = (t != r) & ~near_zero
            assert not bad.any(), f"param{i}@{step}: {int(bad.sum())} elements differ away from a sign tie"


def test_neuro_optima_triton_class_bf16_and_state_dtype(monkeypatch):
    _triton_or_skip()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # available_impls: impl="triton" runs on CPU only so
    data = make_data()
    model = make_model().to(torch.bfloat16)
    ref = make_model().to(torch.bfloat16)
    opt = NeuroOptima(model.parameters(), lr=1e-2, weight_decay=0.01, lookahead_k=2, impl="triton")
    ref_opt = NeuroOptima(ref.parameters(), lr=1e-2, weight_decay=0.01, lookahead_k=2, impl="forloop")
    x, y = data
    for step in range(1, 4):  # crosses a Lookahead sync (k=2)
        xb, yb = batch(step, (x.bfloat16(), y.bfloat16()))
        opt.step(closure_for(model, opt, xb, yb))
        ref_opt.step(closure_for(ref, ref_opt, xb, yb))
    for p in model.parameters():
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())  # fp32 state for bf16 params
    for p, q in zip(model.parameters(), ref.parameters()):
        # fp32 state on both; bf16 sign steps of 1e-2 on O(0.3) weights: a few ulp of drift between the
        # kernel's one rounding of p and the reference's rounding after each op
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=0.1)


# ------------------------------------------------------------------------- step(closure)'s return value
def _skipping(opt):
    opt.skip_if_nonfinite = True
    return opt


def _recording_closure(model, opt, xb, yb, seen):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        seen.append(loss.detach().clone())
        return loss
    return closure


@pytest.mark.parametrize("grads_on_entry", [False, True], ids=["no-grads", "grads-on-entry"])
@pytest.mark.parametrize("make", [
    lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1),
    lambda ps: NeuroOptima(ps, lr=1e-2, sam_rho=0.05),
    lambda ps: NeuroOptima(ps, lr=1e-2, sam_rho=0.0),
    lambda ps: _skipping(NeuroOptima(ps, lr=1e-2, sam_rho=0.05)),
], ids=["sam", "neuro-optima", "neuro-optima-no-sam", "neuro-optima-skip-nonfinite"])
def test_step_closure_returns_the_closures_loss(make, grads_on_entry):
    """`loss = opt.step(closure)` (the README's usage) is the closure's loss on every path: the loss at p
    when step evaluated it there, else the loss of its one evaluation (SAM: at the perturbed point)."""
    model = make_model(3)
    xb, yb = batch(0, make_data())
    opt = make(model.parameters())
    for step in range(3):
        seen = []
        closure = _recording_closure(model, opt, xb, yb, seen)
        if grads_on_entry:
            nn.functional.mse_loss(model(xb), yb).backward()
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor), f"step {step}: step(closure) returned {loss!r}"
        assert seen, "the closure was never called"
        assert torch.equal(loss.detach(), seen[0]), f"step {step}: not the first evaluation's loss"



def test_lookahead_counter_loads_as_saved_tensor_or_earlier_int():
    """Lookahead saves its counter as a 0-d tensor; a state_dict of the current version and one of an
    earlier version (an int) both load, and a counter that is not a whole number >= 0 is refused."""
    import pytest as _pytest
    from fused_optim import Lion, Lookahead

    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    src = Lookahead(Lion([p], lr=1e-3, impl="foreach"), k=2)
    for _ in range(3):
        src.step()
    sd = src.state_dict()
    assert isinstance(sd["param_groups"][0]["lookahead_step"], torch.Tensor)
    for step in (sd["param_groups"][0]["lookahead_step"], 3):
        for g in sd["param_groups"]:
            g["lookahead_step"] = step
        dst = Lookahead(Lion([p], lr=1e-3, impl="foreach"), k=2)
        dst.load_state_dict(sd)
        assert float(dst.lookahead_step) == 3.0
    for bad in (torch.tensor(-1.0), torch.tensor(1.5), -1):
        for g in sd["param_groups"]:
            g["lookahead_step"] = bad
        with _pytest.raises(ValueError, match="lookahead_step"):
            Lookahead(Lion([p], lr=1e-3, impl="foreach"), k=2).load_state_dict(sd)
