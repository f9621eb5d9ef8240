"""Each loss against a dense, obviously-correct reference (values and gradients, float64)."""

import pytest
import torch
import torch.nn.functional as F

from loctune.codecs import LocationSpace
from loctune.losses import (
    LocationLoss,
    LossConfig,
    build_loss,
    list_losses,
    loss_config,
)
from loctune.targets import TargetSpec, make_targets

V, N_LOC, LOC0 = 40, 16, 20  # vocabulary, location tokens at ids 20..35
LOC_IDS = list(range(LOC0, LOC0 + N_LOC))
SPACE = LocationSpace("bins", N_LOC)


def batch(seed=0, b=3, s=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, LOC0, (b, s), generator=g)
    loc = torch.rand(b, s, generator=g) < 0.5
    labels[loc] = torch.randint(LOC0, LOC0 + N_LOC, (int(loc.sum()),), generator=g)
    labels[:, 0] = -100
    labels[0, -2:] = -100
    return logits.requires_grad_(), labels


def dense_targets(labels, spec, cfg=None):
    """[N, V] target rows: one-hot for text, spec over the location slice at location rows."""
    t = torch.zeros(labels.numel(), V, dtype=torch.float64)
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        if y >= LOC0 and spec is not None:
            row = make_targets(spec, torch.tensor([y - LOC0]), SPACE)[0].double()
            if cfg is not None:
                row = row * cfg.soft_weight + cfg.hard_weight * F.one_hot(
                    torch.tensor(y - LOC0), N_LOC
                )
                if cfg.name == "gem":
                    row = row / row.sum()
            t[i, LOC0 : LOC0 + N_LOC] = row
        else:
            t[i, y] = 1.0
    return t


def ref_soft_ce(logits, labels, spec, cfg=None):
    z, lab = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    t = dense_targets(lab, spec, cfg)
    valid = lab != -100
    per = t.sum(1) * torch.logsumexp(z, 1) - (t * z).sum(1)
    if cfg is not None and cfg.soft_kl:  # DIST2Loss as written: CE + w KL(t' || p) at locations
        logp = torch.log_softmax(z, 1)
        ce = -logp.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
        t_loc = dense_targets(lab, spec)[:, LOC0 : LOC0 + N_LOC]
        kl = F.kl_div(logp[:, LOC0 : LOC0 + N_LOC], t_loc, reduction="none").sum(1)
        per = torch.where(lab >= LOC0, cfg.hard_weight * ce + cfg.soft_weight * kl, per)
    return per[valid].sum() / valid.sum()


def ref_gem(logits, labels, spec, beta, h, scope="location"):
    """The official gem_loss, with the soft target entering through z_bar = sum t z."""
    z, lab = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    valid = lab != -100
    t = dense_targets(lab, spec)
    is_loc = lab >= LOC0
    zbar = (t * z).sum(1, keepdim=True)
    with torch.no_grad():
        w = torch.ones_like(z) if h == "linear" else torch.sigmoid(0.01 * (z - zbar))
        q = torch.softmax(z / beta, -1)
    logp = torch.log_softmax(z, -1)
    logp_y = (t * logp).sum(1, keepdim=True)
    gem = -(q * w * (logp_y - logp)).sum(1)
    ce = -(t * logp).sum(1)
    use_gem = is_loc | torch.tensor(scope == "all")
    per = torch.where(use_gem, gem, ce)
    return per[valid].sum() / valid.sum()


def grads(fn, logits):
    logits.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), logits.grad.clone()


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec("one_hot"),
        TargetSpec("distance_inverse", power=2),
        TargetSpec("gaussian", sigma=1.5),
        TargetSpec("label_smoothing"),
    ],
)
def test_soft_ce_matches_dense_reference(spec):
    logits, labels = batch()
    ours = LocationLoss(LossConfig("soft_ce", targets=spec, chunk_elements=4 * V), LOC_IDS, SPACE)
    l1, g1 = grads(lambda: ours(logits, labels), logits)
    l2, g2 = grads(lambda: ref_soft_ce(logits, labels, spec), logits)
    torch.testing.assert_close(l1.double(), l2)
    torch.testing.assert_close(g1, g2)


def test_dist2_mixture_is_ce_plus_weighted_soft_ce():
    logits, labels = batch(1)
    cfg = LossConfig(
        "soft_ce", targets=TargetSpec("gaussian", sigma=1.0), hard_weight=1.0, soft_weight=0.1
    )
    ours = LocationLoss(cfg, LOC_IDS, SPACE)
    l1, g1 = grads(lambda: ours(logits, labels), logits)
    l2, g2 = grads(lambda: ref_soft_ce(logits, labels, cfg.targets, cfg), logits)
    torch.testing.assert_close(l1.double(), l2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("spec", [TargetSpec("one_hot"), TargetSpec("distance_inverse")])
@pytest.mark.parametrize("scope", ["location", "all"])
def test_gem_matches_official_formula(h, spec, scope):
    logits, labels = batch(2)
    ours = LocationLoss(
        LossConfig("gem", targets=spec, beta=0.7, h=h, gem_scope=scope, chunk_elements=5 * V),
        LOC_IDS,
        SPACE,
    )
    l1, g1 = grads(lambda: ours(logits, labels), logits)
    l2, g2 = grads(lambda: ref_gem(logits, labels, spec, 0.7, h, scope), logits)
    torch.testing.assert_close(l1.double(), l2)
    torch.testing.assert_close(g1, g2)


def test_gem_linear_gradient_is_q_minus_t():
    logits, labels = batch(3)
    spec = TargetSpec("distance_inverse")
    ours = LocationLoss(
        LossConfig("gem", targets=spec, beta=0.5, h="linear", gem_scope="all"), LOC_IDS, SPACE
    )
    _, g = grads(lambda: ours(logits, labels), logits)
    z, lab = logits.detach()[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    valid = lab != -100
    expected = (
        (torch.softmax(z / 0.5, -1) - dense_targets(lab, spec)) * valid[:, None] / valid.sum()
    )
    torch.testing.assert_close(g[:, :-1].reshape(-1, V), expected)


def test_one_hot_soft_ce_equals_ce_and_torch():
    logits, labels = batch(4)
    ce = LocationLoss(LossConfig("ce"), LOC_IDS, SPACE)(logits, labels)
    soft = LocationLoss(LossConfig("soft_ce", targets=TargetSpec("one_hot")), LOC_IDS, SPACE)(
        logits, labels
    )
    torch_ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ce, soft)
    torch.testing.assert_close(ce.double(), torch_ce)


def test_gem_beta_one_linear_has_ce_gradient():
    logits, labels = batch(5)
    _, g_gem = grads(
        lambda: build_loss("gem", LOC_IDS, SPACE, beta=1.0, h="linear", gem_scope="all")(
            logits, labels
        ),
        logits,
    )
    _, g_ce = grads(lambda: build_loss("ce", LOC_IDS, SPACE)(logits, labels), logits)
    torch.testing.assert_close(g_gem, g_ce)


def test_no_shift_and_num_items_in_batch():
    logits, labels = batch(6)
    loss = LocationLoss(LossConfig("ce"), LOC_IDS, SPACE)
    unshifted = loss(logits, labels, shift=False)
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(unshifted.double(), ref)
    total = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(
        loss(logits, labels, shift=False, num_items_in_batch=100).double(), total / 100
    )


def test_trainer_compute_loss_func_signature():
    logits, labels = batch(7)

    class Out:
        pass

    out = Out()
    out.logits = logits
    fn = LocationLoss(LossConfig("ce"), LOC_IDS, SPACE).compute_loss_func(shift=True)
    ref = (
        F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
        / 9
    )
    torch.testing.assert_close(fn(out, labels, num_items_in_batch=9).double(), ref)


@pytest.mark.parametrize("name", ["distance_inverse", "gem_distance_inverse"])
@pytest.mark.parametrize("all_supervised", [False, True])  # gathered rows / in-place views
def test_bf16_logits_give_fp32_loss_and_bf16_grad(name, all_supervised):
    logits, labels = batch(8)
    labels = labels.clamp(min=0) if all_supervised else labels
    lb = logits.detach().to(torch.bfloat16).requires_grad_()
    loss = build_loss(name, LOC_IDS, SPACE)
    value = loss(lb, labels)
    value.backward()
    assert value.dtype == torch.float32 and lb.grad.dtype == torch.bfloat16
    wide = lb.detach().double().requires_grad_()
    ref = loss(wide, labels)
    ref.backward()
    assert abs(value.item() - ref.item()) < 1e-5
    torch.testing.assert_close(lb.grad.double(), wide.grad, atol=2e-4, rtol=1e-2)


def test_two_bin_uses_continuous_coordinates():
    logits, labels = batch(9)
    cont = torch.full((*labels.shape, 1), float("nan"), dtype=torch.float64)
    is_loc = labels >= LOC0
    cont[is_loc, 0] = (labels[is_loc] - LOC0).double() + 0.25
    cont[is_loc, 0] = cont[is_loc, 0].clamp(max=N_LOC - 1)
    loss = LocationLoss(LossConfig("soft_ce", targets=TargetSpec("two_bin")), LOC_IDS, SPACE)
    value = loss(logits, labels, continuous=cont)
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match="continuous"):
        loss(logits, labels)


def test_fused_linear_equals_unfused():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (50,), generator=g)
    labels[:5] = -100
    cfg = LossConfig(
        "gem", targets=TargetSpec("distance_inverse"), chunk_elements=1, fused_chunk_rows=16
    )
    loss = LocationLoss(cfg, LOC_IDS, SPACE)
    a = loss.fused_linear(hidden, weight, labels)
    ga = torch.autograd.grad(a, [hidden, weight])
    b = loss(hidden @ weight.T, labels, shift=False)
    gb = torch.autograd.grad(b, [hidden, weight])
    torch.testing.assert_close(a.double(), b.double())
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y)


def test_needs_location_tokens_for_soft_losses():
    with pytest.raises(ValueError, match="location tokens"):
        LocationLoss(LossConfig("soft_ce"), [], None)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ce", {}),
        ("distance_inverse", {}),
        ("gem", {"gem_scope": "all"}),
        ("gem_distance_inverse", {"h": "linear"}),
        ("dist2", {}),
    ],
)
def test_fully_supervised_chunks_write_gradient_in_place(name, overrides):
    """No ignored positions: one group, chunks are views of the logits and of the gradient."""
    logits, labels = batch(10)
    labels = labels.clamp(min=0)
    cfg = loss_config(name, chunk_elements=3 * V, **overrides)
    ours = LocationLoss(cfg, LOC_IDS, SPACE)
    l1, g1 = grads(lambda: ours(logits, labels, shift=False), logits)
    chunk_free = LocationLoss(loss_config(name, **overrides), LOC_IDS, SPACE)
    l2, g2 = grads(lambda: chunk_free(logits.double(), labels, shift=False), logits)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    # the references shift: give them one extra position at each end
    padded_labels = F.pad(labels, (1, 0), value=-100)

    def ref():
        padded = F.pad(logits, (0, 0, 0, 1))
        if cfg.name == "gem":
            return ref_gem(padded, padded_labels, cfg.targets, cfg.beta, cfg.h, cfg.gem_scope)
        return ref_soft_ce(padded, padded_labels, cfg.targets, cfg)

    l3, g3 = grads(ref, logits)
    torch.testing.assert_close(l1, l3)
    torch.testing.assert_close(g1, g3)


def test_fused_linear_with_bias_shift_and_mixed_groups():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    _, labels = batch(11, b=2, s=9)
    loss = build_loss(
        "gem_distance_inverse", LOC_IDS, SPACE, chunk_elements=1, fused_chunk_rows=4
    )  # CE text + GEM loc
    a = loss.fused_linear(hidden, weight, labels, bias=bias, shift=True, num_items_in_batch=7)
    b = loss(hidden @ weight.T + bias, labels, shift=True, num_items_in_batch=7)
    torch.testing.assert_close(a, b)
    for x, y in zip(
        torch.autograd.grad(a, [hidden, weight, bias]),
        torch.autograd.grad(b, [hidden, weight, bias]),
        strict=True,
    ):
        torch.testing.assert_close(x, y)


def test_upstream_gradient_scales_and_second_backward_is_refused():
    logits, labels = batch(12)
    loss = build_loss("distance_inverse", LOC_IDS, SPACE)
    _, g1 = grads(lambda: loss(logits, labels), logits)
    _, g3 = grads(lambda: loss(logits, labels) * 3, logits)
    torch.testing.assert_close(g3, 3 * g1)
    value = loss(logits, labels)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        value.backward()
    with torch.no_grad():
        torch.testing.assert_close(loss(logits, labels), value.detach())


def test_presets_and_overrides():
    assert {
        "ce", "soft_ce", "gem", "gem_distance_inverse", "dist2", "two_bin", "label_smoothing"
    } <= set(list_losses())
    assert loss_config("gem_linear").h == "linear" and loss_config("gem").h == "logsigmoid"
    dist2 = loss_config("dist2")
    assert (dist2.name, dist2.targets.kind, dist2.hard_weight, dist2.soft_weight) == (
        "soft_ce",
        "gaussian",
        1.0,
        0.1,
    )
    cfg = loss_config("gem_distance_inverse", beta=0.5, power=4.0)
    assert cfg.beta == 0.5 and cfg.targets.power == 4.0 and cfg.targets.kind == "distance_inverse"
    with pytest.raises(KeyError, match="unknown loss"):
        loss_config("nope")
    with pytest.raises(TypeError, match="powr"):
        loss_config("gem", powr=3)
    with pytest.raises(ValueError, match="gem_scope"):
        LossConfig("gem", gem_scope="text")


def test_bad_labels_are_named():
    logits, labels = batch(13)
    loss = build_loss("ce", LOC_IDS, SPACE)
    with pytest.raises(ValueError, match="labels"):
        loss(logits, labels[:, :-1])
    labels[0, 3] = V
    with pytest.raises(ValueError, match=r"-100 or in \[0, 40\)"):
        loss(logits, labels)


def test_loss_spec_strings_carry_overrides():
    cfg = loss_config("gem_distance_inverse:beta=2, h=linear,power=3")
    assert (cfg.name, cfg.beta, cfg.h, cfg.targets.kind, cfg.targets.power) == (
        "gem", 2, "linear", "distance_inverse", 3
    )
    assert loss_config("gem:beta=2", beta=0.5).beta == 0.5  # keywords win
    with pytest.raises(ValueError, match="expected name:key=value"):
        loss_config("gem:beta")
    with pytest.raises(TypeError, match="unknown loss option"):
        loss_config("gem:temperature=2")
    with pytest.raises(KeyError, match="unknown loss 'gemm'"):
        loss_config("gemm:beta=2")


# -- the earth-mover term (preset "wasserstein") ------------------------------------------


def cdf_w1(p_loc, y):
    """1-D W1 to a Dirac from the CDFs, Σ_k |F(k) - 1[k >= y]|: the textbook form."""
    cdf = p_loc.cumsum(-1)
    step = (torch.arange(p_loc.shape[-1]) >= y).double()
    return (cdf - step).abs().sum(-1)


def test_wasserstein_adds_the_cdf_w1_to_ce_on_bins():
    logits, labels = batch(3)
    cfg = loss_config("wasserstein", emd_weight=0.7)
    w, g_w = grads(lambda: LocationLoss(cfg, LOC_IDS, SPACE)(logits, labels), logits)
    z, lab = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)

    def ref():
        terms = [
            cdf_w1(torch.softmax(z[i, LOC0 : LOC0 + N_LOC], -1), y - LOC0) / N_LOC
            for i, y in enumerate(lab.tolist()) if y >= LOC0
        ]
        return (
            ref_soft_ce(logits, labels, None)
            + 0.7 * torch.stack(terms).sum() / (lab != -100).sum()
        )

    r, g_r = grads(ref, logits)
    torch.testing.assert_close(w, r)
    torch.testing.assert_close(g_w, g_r)


def test_wasserstein_on_the_patch_grid_is_the_expected_euclidean_distance():
    n = 4  # a 4 x 4 grid of 16 cells at ids 20..35
    grid = LocationSpace("grid", n)
    logits, labels = batch(5)
    loss = LocationLoss(loss_config("wasserstein"), LOC_IDS, grid)
    z, lab = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    rc = torch.tensor([[k // n, k % n] for k in range(16)], dtype=torch.float64)
    terms = [
        (torch.softmax(z[i, LOC0 : LOC0 + N_LOC], -1) * (rc - rc[y - LOC0]).norm(dim=1)).sum() / n
        for i, y in enumerate(lab.tolist()) if y >= LOC0
    ]
    expected = ref_soft_ce(logits, labels, None) + torch.stack(terms).sum() / (lab != -100).sum()
    torch.testing.assert_close(loss(logits, labels), expected)


def test_wasserstein_tells_a_near_miss_from_a_far_one_where_ce_cannot():
    logits = torch.full((1, 2, V), -5.0, dtype=torch.float64)
    labels = torch.tensor([[-100, LOC0 + 5]])
    near, far = logits.clone(), logits.clone()
    near[0, 0, LOC0 + 6] = 5.0
    far[0, 0, LOC0 + 15] = 5.0
    ce, emd = build_loss("ce", LOC_IDS, SPACE), build_loss("wasserstein", LOC_IDS, SPACE)
    torch.testing.assert_close(ce(near, labels), ce(far, labels))
    assert emd(near, labels) < emd(far, labels) - 0.5


def test_wasserstein_fused_linear_equals_unfused():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    _, labels = batch(4, b=2, s=6)
    loss = build_loss("gem", LOC_IDS, SPACE, emd_weight=0.5)
    a = loss.fused_linear(hidden, weight, labels, shift=True)
    ga = torch.autograd.grad(a, (hidden, weight))
    b = loss(hidden @ weight.T, labels)
    gb = torch.autograd.grad(b, (hidden, weight))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y)


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match="soft_kl is a soft_ce option"):
        LossConfig("gem", soft_kl=True)
    with pytest.raises(ValueError, match="emd_weight must be >= 0"):
        LossConfig("ce", emd_weight=-1)
    with pytest.raises(ValueError, match="needs location tokens"):
        LocationLoss(loss_config("wasserstein"), [], None)
