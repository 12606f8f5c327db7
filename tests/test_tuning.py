"""The launch-configuration tuner (mimfast.kernels.tuning) and the launchers that use it.

On the CPU nothing is tuned; these tests make the tuner apply to the CPU and replace its GPU
timing with set figures, so its choice, its cache, its margin, dropped candidates and the
launchers' use of the choice are checked without a GPU. Every attention candidate is held to
the eager reference, since the tuner may pick any of them."""

from dataclasses import replace

import pytest
import torch

from mimfast import ops
from mimfast.kernels import attention as K
from mimfast.kernels import tuning
from test_attention_kernel import check_against_reference


@pytest.fixture
def tuner(monkeypatch):
    """Tuning on for every device, timed by ``times`` (candidate name -> ms, or an exception
    to raise); ``runs`` lists the names whose measurement ran."""
    state = {"times": {}, "runs": []}

    def measure(run, cand, device):
        name = state["names"].get(id(cand), cand) if "names" in state else cand
        state["runs"].append(name)
        run(cand)
        t = state["times"].get(name, 1.0)
        if isinstance(t, Exception):
            raise t
        return t

    tuning.reset()
    monkeypatch.setattr(tuning, "applies", lambda device: True)
    monkeypatch.setattr(tuning, "_measure", measure)
    monkeypatch.delenv(tuning.ENV, raising=False)
    yield state
    tuning.reset()


CPU = torch.device("cpu")


def _choose(key, names, calls):
    return tuning.choose(key, [(n, n) for n in names], calls.append, CPU)


def test_picks_the_fastest_and_caches_it(tuner):
    tuner["times"] = {"a": 1.0, "b": 0.5, "c": 0.7}
    calls = []
    assert _choose("k", ["a", "b", "c"], calls) == "b"
    assert tuner["runs"] == ["a", "b", "c"] and calls == ["a", "b", "c"]
    assert _choose("k", ["a", "b", "c"], calls) == "b"  # from the cache: nothing runs again
    assert tuner["runs"] == ["a", "b", "c"]
    (report,) = tuning.chosen()
    assert report["chosen"] == "b" and report["ms"] == {"a": 1.0, "b": 0.5, "c": 0.7}
    assert _choose("other", ["a", "c"], calls) == "c"
    assert [r["chosen"] for r in tuning.chosen()] == ["b", "c"]


def test_default_kept_within_the_margin(tuner):
    tuner["times"] = {"a": 1.0, "b": 1.0 - tuning.MARGIN / 2}
    assert _choose("k", ["a", "b"], []) == "a"
    tuner["times"] = {"a": 1.0, "b": 1.0 - 2 * tuning.MARGIN}
    assert _choose("k2", ["a", "b"], []) == "b"


def test_failing_candidates_are_dropped(tuner):
    tuner["times"] = {"a": 1.0, "b": RuntimeError("out of resources"), "c": 2.0}
    assert _choose("k", ["a", "b", "c"], []) == "a"
    report = tuning.chosen()[0]
    assert report["ms"]["b"] is None and "out of resources" in report["errors"]["b"]
    # a failing default: the fastest that ran
    tuner["times"] = {"a": RuntimeError("x"), "b": 3.0, "c": 2.0}
    assert _choose("k2", ["a", "b", "c"], []) == "c"
    # nothing ran: the default
    tuner["times"] = {"a": RuntimeError("x"), "b": RuntimeError("y")}
    assert _choose("k3", ["a", "b"], []) == "a"


def test_winners_are_combined(tuner):
    """With ``combine``: the fastest candidate that beats the default is also timed together with
    each of the next ``COMBINED`` that do (not with losers, not where combine says no or gives a
    candidate already timed), and a combination can be the choice."""
    tuner["times"] = {"a": 1.0, "b": 0.5, "c": 0.6, "d": 0.7, "e": 0.8, "f": 2.0, "bc": 0.3, "bd": 0.55}
    merged = []

    def combine(x, y):
        merged.append((x, y))
        return None if y == "e" else x + y

    assert tuning.COMBINED == 2
    assert tuning.choose("k", [(n, n) for n in "abcdef"], [].append, CPU, combine=combine) == "bc"
    assert merged == [("b", "c"), ("b", "d")] and tuner["runs"] == list("abcdef") + ["bc", "bd"]
    (report,) = tuning.chosen()
    assert report["chosen"] == "b+c" and report["ms"]["b+d"] == 0.55
    # a combination slower than its parts: the fastest part; no second winner: nothing combined
    tuner["times"].update(bc=0.9, bd=0.9)
    assert tuning.choose("k2", [(n, n) for n in "abcd"], [].append, CPU, combine=lambda x, y: x + y) == "b"
    tuner["runs"].clear()
    assert tuning.choose("k3", [(n, n) for n in "abf"], [].append, CPU, combine=lambda x, y: x + y) == "b"
    assert tuner["runs"] == list("abf")
    # a combination equal to a timed candidate is not timed again
    tuner["runs"].clear()
    assert tuning.choose("k4", [(n, n) for n in "abc"], [].append, CPU, combine=lambda x, y: "a") == "b"
    assert tuner["runs"] == list("abc")


def test_attention_combines_winning_changes(tuner, device):
    """The attention backward's combination of two winning candidates (a BEiT-like shape: the dq
    kernel keys-major, and the partial query blocks of the dk / dv kernel in steps of 16) is their two
    changes on the default, launched when chosen, and gives the reference's gradients; a change
    that does not apply under the other (a tail under the one-pass backward) is not combined."""
    S, Dh = 100, 64
    bwd = dict(K._tuning_candidates(S, Dh, True, torch.float16, "bwd"))
    base = bwd["default"]
    combine = K._shape_combiner("bwd", S, Dh, True, torch.float16, "ieee", True, False)
    both = combine(bwd["dq_keys_major"], bwd["bwd_tail_16"])
    assert both == replace(base, dq_keys_major=True, dq_block_n=bwd["dq_keys_major"].dq_block_n, bwd_tail=16)
    assert combine(bwd["bwd_onepass_m16"], bwd["bwd_tail_16"]) is None  # one pass: no dk / dv kernel
    assert combine(bwd["bias_grad_regs_m16"], bwd["bias_grad_regs_m32"]) is None  # both set dq_block_m
    tuner["names"] = {id(c): n for n, c in bwd.items()}
    tuner["times"] = {n: 1.0 for n in bwd}
    tuner["times"].update(dq_keys_major=0.5, bwd_tail_16=0.6)
    tuner["times"][both] = 0.4  # the fixture names an unnamed candidate by itself
    check_against_reference(1, S, 1, Dh, torch.float16, device, bias=True)
    report = [r for r in tuning.chosen() if "attention_bwd" in r["key"]]
    assert report and all(r["chosen"] == "dq_keys_major+bwd_tail_16" for r in report)


def test_off_untuned_and_single_candidates(tuner, monkeypatch):
    tuner["times"] = {"a": 1.0, "b": 0.1}
    assert _choose("single", ["a"], []) == "a" and tuner["runs"] == []
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(tuning.ENV, off)
        assert not tuning.enabled()
        assert _choose("k", ["a", "b"], []) == "a"
    assert tuner["runs"] == [] and tuning.chosen() == []
    monkeypatch.setenv(tuning.ENV, "1")
    assert _choose("k", ["a", "b"], []) == "b"  # not cached while off: tuned once on


def test_cpu_is_never_tuned(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    assert not tuning.applies(CPU)
    ran = []
    assert tuning.choose("cpu-key", [("a", "a"), ("b", "b")], ran.append, CPU) == "a"
    assert ran == [] and all(r["key"] != repr("cpu-key") for r in tuning.chosen())


@pytest.mark.parametrize("S,Dh,bias", [(33, 16, False), (50, 64, True), (65, 16, True), (65, 80, False),
                                       (130, 32, True), (140, 32, False), (100, 64, True)])
def test_every_attention_candidate_matches_the_reference(S, Dh, bias, device):
    """Each configuration the launchers may choose, at the shape it is offered for (fp16: the
    interpreter's bf16 dot is wrong)."""
    cands = K.candidate_configs(S, Dh, bias, torch.float16)
    assert list(cands)[0] == "default" and len(cands) > 1
    for name, cfg in cands.items():
        check_against_reference(2, S, 1, Dh, torch.float16, device, bias=bias, config=cfg)


@pytest.mark.parametrize("S,Dh,bias", [(100, 64, True), (65, 80, False), (133, 64, False)])
def test_every_combination_of_attention_candidates_matches_the_reference(S, Dh, bias, device):
    """Every pair of forward or backward candidates the tuner may combine (two winners), combined
    as it would be, at BEiT-like (S <= 128 and > 128) and ViT-H/14-like shapes. (The candidates
    offered only above S = 128, the keys-major forward and three stages, are checked here, inside
    their combinations, and the keys-major forward alone in test_configs_agree.)"""
    combined = [c for part in ("fwd", "bwd") for c in K.candidate_combinations(S, Dh, bias, torch.float16, part)]
    assert len(combined) >= 10
    for cfg in combined:
        check_against_reference(1, S, 1, Dh, torch.float16, device, bias=bias, config=cfg)


def test_attention_candidates_split_into_forward_and_backward_choices():
    S, Dh = 197, 64
    fwd = K._tuning_candidates(S, Dh, True, torch.bfloat16, "fwd")
    bwd = K._tuning_candidates(S, Dh, True, torch.bfloat16, "bwd")
    base = K.default_config(S, Dh, True, torch.bfloat16)
    assert fwd[0] == ("default", base) and bwd[0] == ("default", base)
    fwd_fields = set(K._FWD_FIELDS)
    for _, cfg in fwd:  # forward candidates differ from the default in forward fields only
        assert all(getattr(cfg, f) == getattr(base, f) for f in cfg.__dataclass_fields__ if f not in fwd_fields)
    for _, cfg in bwd:
        assert all(getattr(cfg, f) == getattr(base, f) for f in fwd_fields)
    assert len({c for _, c in fwd}) == len(fwd) >= 3 and len({c for _, c in bwd}) == len(bwd) >= 5
    # every forward field is one (a forward change filed as a backward one would be timed on the
    # backward, where it changes nothing), and every candidate's change is offered on its side
    assert {f for f in base.__dataclass_fields__ if f.startswith("fwd_")} == fwd_fields
    fwd_names, bwd_names = dict(fwd), dict(bwd)
    for name, cfg in list(K.candidate_configs(S, Dh, True, torch.bfloat16).items())[1:]:
        changed = {f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(base, f)}
        assert (name in fwd_names) == bool(changed & fwd_fields), name
        assert (name in bwd_names) == bool(changed - fwd_fields), name
    assert K.candidate_configs(S, Dh, True, torch.float32) == {"default": K.default_config(S, Dh, True, torch.float32)}


def test_attention_launches_the_tuned_choice(tuner, device):
    """The op with no config: forward and backward each tune once per shape, launch the choice
    (which gives the reference's result), and later calls reuse it."""
    B, S, H, Dh = 2, 50, 2, 16
    fwd = dict(K._tuning_candidates(S, Dh, False, torch.float16, "fwd"))
    bwd = dict(K._tuning_candidates(S, Dh, False, torch.float16, "bwd"))
    tuner["names"] = {id(c): n for n, c in list(fwd.items()) + list(bwd.items())}
    tuner["times"] = {n: 1.0 for n in list(fwd) + list(bwd)}
    tuner["times"].update(fwd_half_rows_2warps=0.5, split_bwd=0.5)
    launched = []
    real_fwd = K._fwd_plan

    def spy(config, *a):
        launched.append(config)
        return real_fwd(config, *a)

    K._fwd_plan.cache_clear()
    try:
        torch.manual_seed(1)
        qkv = torch.randn(B, S, 3 * H * Dh, device=device, dtype=torch.float16, requires_grad=True)
        g = torch.randn(B, S, H * Dh, device=device, dtype=torch.float16)
        import mimfast.kernels.attention as mod

        mod._fwd_plan = spy
        out = ops.attention(qkv, H, backend="triton")
        out.backward(g)
        assert launched[-1] == fwd["fwd_half_rows_2warps"]
        assert {r["chosen"] for r in tuning.chosen()} == {"fwd_half_rows_2warps", "split_bwd"}
        n_runs = len(tuner["runs"])
        assert n_runs == len(fwd) + len(bwd)
        out2 = ops.attention(qkv.detach(), H, backend="triton")
        assert len(tuner["runs"]) == n_runs and launched[-1] == fwd["fwd_half_rows_2warps"]
        torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)
    finally:
        mod._fwd_plan = real_fwd
    q64 = qkv.detach().double().requires_grad_()
    ref = ops.attention(q64, H, backend="eager")
    ref.backward(g.double())
    assert (out.double() - ref).abs().max() < 5e-3
    assert (qkv.grad.double() - q64.grad).abs().max() < 5e-3


@pytest.mark.parametrize("D", [80, 768])
def test_every_layer_norm_candidate_matches_the_default(D, device):
    """The add + LayerNorm launchers' candidates: forward rows bit for bit the default's (each row's
    arithmetic does not depend on the tiling); backward rows and the weight / bias / scale sums to
    rounding (a candidate with fewer warps sums a row's two dot products in another order: the H200
    run's 8_per_thread differed in the last bits)."""
    from mimfast.kernels import layer_norm as LN

    M = 37
    x = torch.randn(M, D, device=device, dtype=torch.float16)
    res = torch.randn(M, D, device=device, dtype=torch.float32)
    w, b, s = (torch.randn(D, device=device) for _ in range(3))
    fwd, bwd = LN._candidates(D, False), LN._candidates(D, True)
    assert fwd[0][1][:3] == LN._blocks(D, False) and bwd[0][1][:3] == LN._blocks(D, True)
    assert len(fwd) >= 2 and len(bwd) >= 3
    want = LN.add_layer_norm_fwd(x, res, w, b, s, 1e-6, torch.bfloat16)
    for name, cfg in fwd:
        got = LN.add_layer_norm_fwd(x, res, w, b, s, 1e-6, torch.bfloat16, cfg)
        for g, e in zip(got, want):
            assert torch.equal(g, e), name
    r, _, mean, rstd = want
    dy = torch.randn(M, D, device=device, dtype=torch.bfloat16)
    dr = torch.randn(M, D, device=device, dtype=torch.float32)
    args = (dy, dr, r, x, w, s, mean, rstd, torch.float16, torch.float32, True, True, True, True, True)
    dx0, dres0, sums0 = LN.add_layer_norm_bwd(*args)
    for name, cfg in bwd:
        dx, dres, sums = LN.add_layer_norm_bwd(*args, config=cfg)
        torch.testing.assert_close(dx, dx0, rtol=2e-3, atol=2e-3, msg=name)  # fp16: an ulp
        torch.testing.assert_close(dres, dres0, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(sums, sums0, rtol=1e-5, atol=1e-4)


def test_every_patch_loss_candidate_matches_the_default(device):
    from mimfast.kernels import patch_loss as PL

    N, C, H, W, p = 3, 3, 32, 48, 16
    L, P = (H // p) * (W // p), p * p * C
    pred = torch.randn(N, 1 + L, P, device=device)[:, 1:]
    imgs = torch.randn(N, C, H, W, device=device)
    mask = (torch.rand(N, L, device=device) < 0.75).float()
    cands = PL._candidates(*PL._config(1024, interpreted=False), 1, C)
    names = [name for name, _ in cands]
    assert names == ["default", "other_order", "one_tile", "half_rows_4w", "two_warps", "prefetch",
                     "prefetch_half_rows", "prefetch_two_warps", "permuted", "permuted_one_tile", "permuted_prefetch"]
    assert not any("permuted" in name for name, _ in PL._candidates(*PL._config(256, interpreted=False), 1, 1))
    want_loss, want_grad = PL.patch_loss_fwd(pred, imgs, mask, p)
    for name, cfg in cands:
        loss, grad = PL.patch_loss_fwd(pred, imgs, mask, p, config=cfg)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7, msg=name)


def test_layer_norm_and_patch_loss_launch_the_tuned_choice(tuner, device):
    from mimfast.kernels import layer_norm as LN
    from mimfast.kernels import patch_loss as PL

    D, M = 768, 9
    fwd, bwd = dict(LN._candidates(D, False)), dict(LN._candidates(D, True))
    x, res = torch.randn(M, D, device=device), torch.randn(M, D, device=device)
    w = torch.randn(D, device=device)
    N, C, H, W, p = 2, 3, 16, 32, 16
    pred = torch.randn(N, (H // p) * (W // p), p * p * C, device=device)
    imgs = torch.randn(N, C, H, W, device=device)
    mask = torch.ones(N, pred.shape[1], device=device)
    # the candidates the tuner times: around the heuristic's tiling (on the CPU the interpreter's)
    pl_cands = dict(PL._candidates(*PL._config(1024, interpreted=device == "cpu"), 1, C))
    tuner["names"] = {id(c): n for d in (fwd, bwd, pl_cands) for n, c in d.items()}
    tuner["times"] = {"half_rows": 0.1, "two_waves": 0.1, "one_tile": 0.1}
    r, y, mean, rstd = LN.add_layer_norm_fwd(x, res, w, None, None, 1e-6, torch.float32)
    LN.add_layer_norm_bwd(torch.randn_like(y), None, r, x, w, None, mean, rstd, torch.float32, torch.float32,
                          True, True, True, False, False)
    loss, grad = PL.patch_loss_fwd(pred, imgs, mask, p)
    assert [c["chosen"] for c in tuning.chosen()] == ["half_rows", "two_waves", "one_tile"]
    want_loss, want_grad = PL.patch_loss_fwd(pred, imgs, mask, p, config=pl_cands["one_tile"])
    assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    assert torch.equal(y, LN.add_layer_norm_fwd(x, res, w, None, None, 1e-6, torch.float32, fwd["half_rows"])[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times candidates on a CUDA device")
def test_tuning_on_the_gpu(monkeypatch):
    """Real timing: the attention, add + LayerNorm and patch-loss launchers tune at their first
    call, record every candidate's time, keep results equal to the reference's, and a CUDA
    graph captured at a shape not yet tuned launches the default without synchronising."""
    monkeypatch.setenv(tuning.ENV, "1")
    tuning.reset()
    try:
        B, S, H, Dh = 8, 50, 4, 64
        qkv = torch.randn(B, S, 3 * H * Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = ops.attention(qkv, H, backend="triton")
        out.float().square().sum().backward()
        ref = ops.attention(qkv.detach().float(), H, backend="eager")
        assert (out.float() - ref).abs().max() < 3e-2
        x = torch.randn(B * S, 768, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(B * S, 768, device="cuda")
        w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
        _, y = ops.add_layer_norm(x, res, w, b, eps=1e-6, backend="triton")
        torch.testing.assert_close(y.float(), torch.nn.functional.layer_norm(res + x.float(), (768,), w, b, 1e-6),
                                   rtol=2e-2, atol=2e-2)
        kinds = [t["key"].split(",")[0].strip("('\"") for t in tuning.chosen()]
        assert {"attention_fwd", "attention_bwd", "add_ln_fwd"} <= set(kinds), kinds
        for t in tuning.chosen():
            assert t["ms"]["default"] is not None and t["ms"]["default"] > 0, t
        n = len(tuning.chosen())
        q2 = torch.randn(2, 17, 3 * H * Dh, device="cuda", dtype=torch.bfloat16)
        ops.attention(q2, H, backend="triton")  # warm the default's compile outside the capture
        tuning.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o2 = ops.attention(q2, H, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        assert tuning.chosen() == [] and n >= 3
        torch.testing.assert_close(o2.float(), ops.attention(q2.float(), H, backend="eager"), rtol=3e-2, atol=3e-2)
    finally:
        tuning.reset()


@pytest.mark.parametrize("D", [48, 512, 1280])
def test_every_masking_tile_candidate_matches_the_default(D, device, monkeypatch):
    """The row-tile kernels' candidates (GPU tilings, run interpreted): gathers bit for bit the
    default's, the batch sums (mask token, positional embedding) to rounding."""
    from mimfast.kernels import masking as M

    monkeypatch.setattr(M, "GPU_TILES_ON_CPU", True)
    N, L, K = 3, 20, 6
    ids_restore = torch.argsort(torch.argsort(torch.rand(N, L, device=device), 1), 1)
    x = torch.randn(N, K + 1, D, device=device)
    mt, pos = torch.randn(D, device=device), torch.randn(L + 1, D, device=device)
    g = torch.randn(N, L + 1, D, device=device)
    gv = torch.randn(N, K, D, device=device)
    cands = M._tile_candidates(L + 1, D)
    assert cands[0][1][:2] == M._row_tiles_of(True, L + 1, D) and len(cands) >= 3
    want_f = M.unshuffle_forward(x, mt, ids_restore, pos)
    want_b = M.unshuffle_backward(g, ids_restore, K, torch.float32, torch.float32, torch.float32)
    want_m = M.masking_backward(gv, ids_restore, L, torch.float32, torch.float32)
    for name, t in cands + M._tile_candidates(L, D):
        assert torch.equal(M.unshuffle_forward(x, mt, ids_restore, pos, tiles=t), want_f), name
        gx, gmt, gpos = M.unshuffle_backward(g, ids_restore, K, torch.float32, torch.float32, torch.float32, tiles=t)
        assert torch.equal(gx, want_b[0]), name
        torch.testing.assert_close(gmt, want_b[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpos, want_b[2], rtol=1e-5, atol=1e-5)
        mx, mpos = M.masking_backward(gv, ids_restore, L, torch.float32, torch.float32, tiles=t)
        assert torch.equal(mx, want_m[0]), name
        torch.testing.assert_close(mpos, want_m[1], rtol=1e-5, atol=1e-5)
    # the un-shuffle backward's own candidates: more programs, each summing fewer samples
    bwd_cands = M._unshuffle_bwd_candidates(L + 1, D)
    assert any(len(t) == 4 and t[3] > 1 for _, t in bwd_cands)
    for name, t in bwd_cands:
        gx, gmt, gpos = M.unshuffle_backward(g, ids_restore, K, torch.float32, torch.float32, torch.float32, tiles=t)
        assert torch.equal(gx, want_b[0]), name
        torch.testing.assert_close(gmt, want_b[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpos, want_b[2], rtol=1e-5, atol=1e-5)


def test_unshuffle_launches_the_tuned_tiles(tuner, device, monkeypatch):
    from mimfast.kernels import masking as M

    monkeypatch.setattr(M, "GPU_TILES_ON_CPU", True)
    N, L, K, D = 2, 9, 3, 64
    cands = dict(M._tile_candidates(L + 1, D))
    tuner["names"] = {id(c): n for n, c in cands.items()}
    tuner["times"] = {"half_rows": 0.5}
    ids_restore = torch.argsort(torch.rand(N, L, device=device), 1).argsort(1)
    x, mt = torch.randn(N, K + 1, D, device=device), torch.randn(D, device=device)
    out = M.unshuffle_forward(x, mt, ids_restore, None)
    assert [c["chosen"] for c in tuning.chosen()] == ["half_rows"]
    assert torch.equal(out, M.unshuffle_forward(x, mt, ids_restore, None, tiles=cands["default"]))


def test_every_gelu_colsum_candidate_matches_the_default(device, monkeypatch):
    """The GELU + column-sum kernel's candidates with their GPU tilings (run interpreted)."""
    from mimfast.kernels import gelu as G

    real = G._colsum_tiles
    monkeypatch.setattr(G, "_colsum_tiles", lambda M, N, gpu, sms, config=None: real(M, N, True, 2, config))
    h, da = torch.randn(45, 700, device=device), torch.randn(45, 700, device=device)
    want = G.gelu_bwd_recompute_colsum(h, da)
    assert G._COLSUM_CANDIDATES[0][0] == "default"
    for name, cfg in G._COLSUM_CANDIDATES:
        a, dh, db = G.gelu_bwd_recompute_colsum(h, da, cfg)
        assert torch.equal(a, want[0]) and torch.equal(dh, want[1]), name
        torch.testing.assert_close(db, want[2], rtol=1e-5, atol=1e-5)
