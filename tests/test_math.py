"""The mathematics of docs/method.md §2-§6 against closed forms, float64 re-derivations and diffusers."""

import numpy as np
import pytest
import torch

from cmdistill.errors import UserError
from cmdistill.guidance import GuidedEps, unconditional
from cmdistill.objectives import DistillContext, cm_target, direct_cm_target, distance
from cmdistill.sampling import consistency_fn, student_sample, teacher_sample
from cmdistill.schedule import Grid, NoiseSchedule, boundary_scalings, scaled_linear_betas
from cmdistill.solvers import (SOLVERS, ddim_step, euler_step, heun_step, solve_to_zero,
                               solve_to_zero_reference)

SCHED = NoiseSchedule.sdxl()
ACP = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def np_alpha(t):
    return 1.0 if t == 0 else np.sqrt(ACP[t - 1])


def np_sigma(t):
    return 0.0 if t == 0 else np.sqrt(1 - ACP[t - 1])


def np_beta(t):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return 1000 * betas[t - 1]


# ---- schedule and grid (docs/method.md §1, §2) --------------------------------------------------------------

def test_schedule_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = NoiseSchedule.from_scheduler(ref)
    x0, eps = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([1, 10, 500, 999, 1000])
    ours = sched.add_noise(x0, eps, t)
    theirs = ref.add_noise(x0, eps, t - 1)  # value t is read at index t - 1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    x = torch.zeros(1, 1)
    assert sched.alpha(0, x).item() == 1.0 and sched.sigma(0, x).item() == 0.0
    assert torch.allclose(sched.betas, scaled_linear_betas())


def test_grid_and_sampling_timesteps():
    g = Grid(1000, 100)
    assert g.k == 10 and g.start_timesteps()[0] == 1000 and g.start_timesteps()[-1] == 10
    assert g.sampling_timesteps(1) == [1000]
    assert g.sampling_timesteps(2) == [1000, 500]
    assert g.sampling_timesteps(4) == [1000, 750, 500, 250]
    assert g.sampling_timesteps(8) == [1000, 880, 750, 620, 500, 380, 250, 120]
    with pytest.raises(UserError, match="must divide"):
        Grid(1000, 33)


def test_boundary_condition_f_x_0_is_x():
    x = torch.randn(3, 4, 5, 5)
    c_skip, c_out = boundary_scalings(torch.zeros(3), x)
    assert torch.all(c_skip == 1) and torch.all(c_out == 0)
    wild = lambda x, t, c: 1e3 * torch.randn_like(x)  # noqa: E731 - any eps
    assert torch.equal(consistency_fn(wild, x, torch.zeros(3, dtype=torch.long), {}, SCHED), x)
    c_skip, c_out = boundary_scalings(torch.tensor([10.0]), torch.zeros(1, 1))
    assert abs(c_skip.item() - 0.25 / (100**2 + 0.25)) < 1e-9 and abs(c_out.item() - 100 / (100**2 + 0.25) ** 0.5) < 1e-7


# ---- solvers (docs/method.md §4) ----------------------------------------------------------------------------

def test_ddim_matches_diffusers_ddim_step():
    from diffusers import DDIMScheduler

    N = 20
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    ref.set_timesteps(N)
    g = Grid(1000, N)
    x = torch.randn(2, 4, 6, 6)
    x_ref = x.clone()
    eps_table = {int(t): torch.randn(2, 4, 6, 6) for t in g.start_timesteps()}
    eps_fn = lambda x, t, c: eps_table[int(t[0])]  # noqa: E731
    for t in g.start_timesteps():
        t = int(t)
        x = ddim_step(eps_fn, x, torch.full((2,), t), torch.full((2,), t - g.k), {}, SCHED)
        x_ref = ref.step(eps_table[t], t - 1, x_ref, eta=0.0).prev_sample  # diffusers indexes by t - 1
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


def test_ddim_is_exact_for_point_mass_data():
    """With data at a single point mu, the exact eps is (x - alpha mu) / sigma and DDIM lands on the
    exact PF-ODE solution alpha_s mu + sigma_s eps0 at every grid point (closed form)."""
    mu = torch.randn(3, 4, 4, 4)
    eps0 = torch.randn_like(mu)
    g = Grid(1000, 50)
    exact_eps = lambda x, t, c: (x - SCHED.alpha(t, x) * mu) / SCHED.sigma(t, x)  # noqa: E731
    x = SCHED.add_noise(mu, eps0, torch.full((3,), 1000))
    out = solve_to_zero(ddim_step, exact_eps, x, torch.zeros(3, dtype=torch.long), {}, SCHED, g)
    torch.testing.assert_close(out, mu, rtol=1e-4, atol=1e-4)


def _np_step(name, eps_fn, x, t, s):
    """Independent float64 NumPy formulation of docs/method.md §4."""
    e = eps_fn(x, t)
    if name == "ddim":
        x0 = (x - np_sigma(t) * e) / np_alpha(t)
        return np_alpha(s) * x0 + np_sigma(s) * e
    f = -0.5 * np_beta(t) * x + 0.5 * np_beta(t) / np_sigma(t) * e
    xe = x + (s - t) / 1000 * f
    if name == "euler":
        return xe
    sc = 1 if s == 0 else s
    fs = -0.5 * np_beta(sc) * xe + 0.5 * np_beta(sc) / np_sigma(sc) * eps_fn(xe, s)
    return x + 0.5 * (s - t) / 1000 * (f + fs)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_solvers_match_float64_formulation(name):
    W = np.random.default_rng(0).normal(size=(8, 8)) * 0.3

    def np_eps(x, t):
        return np.tanh(x @ W) * (1 + t / 1000)

    def eps_fn(x, t, c):
        tt = torch.as_tensor(t).double().view(-1, 1)
        return (torch.tanh(x.double() @ torch.from_numpy(W)) * (1 + tt / 1000)).float()

    x = np.random.default_rng(1).normal(size=(1, 8))
    g = Grid(1000, 10)
    xt = torch.from_numpy(x).float()
    for t in g.start_timesteps().tolist():
        x = _np_step(name, np_eps, x, t, t - g.k)
        xt = SOLVERS[name](eps_fn, xt, torch.tensor([t]), torch.tensor([t - g.k]), {}, SCHED)
    np.testing.assert_allclose(xt.double().numpy(), x, rtol=2e-4, atol=2e-4)


def test_heun_evaluates_teacher_at_zero_with_index0_coefficients():
    seen = []

    def eps_fn(x, t, c):
        seen.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return 0.5 * x

    x = torch.randn(1, 8)
    out = heun_step(eps_fn, x, torch.tensor([10]), torch.tensor([0]), {}, SCHED)
    assert seen == [10, 0]
    ref = _np_step("heun", lambda x, t: 0.5 * x, x.double().numpy(), 10, 0)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()


def test_euler_and_heun_converge_at_their_orders():
    """Gaussian data N(0, s^2 I) has the exact eps sigma_t x / v_t (v_t = alpha_t^2 s^2 + sigma_t^2).
    Against a tight scipy solution of the same ODE, the error of Euler halves and that of Heun
    quarters when the step halves."""
    from scipy.integrate import solve_ivp

    s2 = 0.25
    tt = np.arange(1, 1001)
    alpha_tab, sigma_tab = np.sqrt(ACP), np.sqrt(1 - ACP)
    beta_tab = np.array([np_beta(t) for t in tt])
    lerp = lambda tab, t: np.interp(t, tt, tab)  # noqa: E731

    def rhs(t, x):
        a, s, b = lerp(alpha_tab, t), lerp(sigma_tab, t), lerp(beta_tab, t)
        e = s * x / (a * a * s2 + s * s)
        return (-0.5 * b * x + 0.5 * b / s * e) / 1000

    x_T = np.array([1.3, -0.7, 0.2])
    t_end = 200
    exact = solve_ivp(rhs, (1000, t_end), x_T, rtol=1e-11, atol=1e-12, method="DOP853").y[:, -1]

    def eps_fn(x, t, c):
        t = torch.as_tensor(t).double().view(-1, 1)
        a = torch.from_numpy(lerp(alpha_tab, t.numpy())).view(-1, 1)
        s = torch.from_numpy(lerp(sigma_tab, t.numpy())).view(-1, 1)
        return (s * x.double() / (a * a * s2 + s * s)).float()

    def err(step, N):
        g = Grid(1000, N)
        x = torch.from_numpy(x_T).float().view(1, -1)
        for t in range(1000, t_end, -g.k):
            x = step(eps_fn, x, torch.tensor([t]), torch.tensor([t - g.k]), {}, SCHED)
        return np.abs(x.double().numpy()[0] - exact).max()

    e_euler = [err(euler_step, N) for N in (25, 50, 100)]
    e_heun = [err(heun_step, N) for N in (25, 50, 100)]
    assert 1.6 < e_euler[0] / e_euler[1] < 2.6 and 1.6 < e_euler[1] / e_euler[2] < 2.6
    assert e_heun[0] / e_heun[1] > 3.2 and e_heun[1] / e_heun[2] > 3.0
    assert e_heun[2] < e_euler[2] / 10


# ---- the solve-to-zero loops and the objectives (docs/method.md §6) -----------------------------------------

def _cond_net(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 4)

    def eps_fn(x, t, cond):
        t = torch.as_tensor(t).float().view(-1, 1, 1, 1)
        h = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.tanh(h + cond["prompt_embeds"].view(-1, 4, 1, 1) * t / 1000)

    return eps_fn


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_skip_inactive_loop_equals_reference_masked_loop_and_per_sample(solver):
    g = Grid(1000, 10)
    B = 6
    x = torch.randn(B, 4, 3, 3)
    cond = {"prompt_embeds": torch.randn(B, 4)}
    start = torch.tensor([0, 3, 9, 5, 5, 7])
    eps_fn = _cond_net()
    with torch.no_grad():
        ours = solve_to_zero(SOLVERS[solver], eps_fn, x, start, cond, SCHED, g)
        chunked = solve_to_zero(SOLVERS[solver], eps_fn, x, start, cond, SCHED, g, max_batch=2)
        reference = solve_to_zero_reference(SOLVERS[solver], eps_fn, x, start, cond, SCHED, g)
        one_by_one = torch.cat([solve_to_zero(SOLVERS[solver], eps_fn, x[i:i + 1], start[i:i + 1],
                                              {"prompt_embeds": cond["prompt_embeds"][i:i + 1]}, SCHED, g)
                                for i in range(B)])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_by_one, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["ddim", "heun"])
@pytest.mark.parametrize("capacity", [6, 4, 9])
def test_trajectory_pool_gives_each_batch_its_own_solve_to_zero(solver, capacity):
    """Three batches submitted ahead and solved together (TrajectoryPool): each result equals that batch's
    own solve_to_zero; every call but the last few is full, and the calls do the same sample-steps."""
    from cmdistill.fast import TrajectoryPool

    g, B = Grid(1000, 10), 6
    eps_fn = _cond_net()
    sizes = []
    pool = TrajectoryPool(SOLVERS[solver], eps_fn, SCHED, g, capacity, callback=sizes.append)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(B, 4, 3, 3, generator=gen), torch.randint(0, g.N, (B,), generator=gen),
                {"prompt_embeds": torch.randn(B, 4, generator=gen)}) for _ in range(3)]
    with torch.no_grad():
        for k, (x, start, cond) in enumerate(batches):
            pool.submit(k, x, start, cond)
        with pytest.raises(KeyError, match="not the oldest"):
            pool.result(1)
        for k, (x, start, cond) in enumerate(batches):
            got = pool.result(k)
            torch.testing.assert_close(got, solve_to_zero(SOLVERS[solver], eps_fn, x, start, cond, SCHED, g),
                                       rtol=1e-6, atol=1e-6)
    assert len(pool) == 0
    assert sum(sizes) == sum(int((g.N - s).sum()) for _, s, _ in batches)
    assert max(sizes) <= capacity and sizes[: len(sizes) // 2] == [capacity] * (len(sizes) // 2)


def test_trajectory_pool_fills_calls_that_one_batch_leaves_half_empty():
    from cmdistill.fast import TrajectoryPool

    g, B = Grid(1000, 100), 16
    gen = torch.Generator().manual_seed(0)
    calls = {"alone": 0, "pool": 0}
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    starts = [torch.randint(0, g.N, (B,), generator=gen) for _ in range(20)]
    for s in starts:
        solve_to_zero(ddim_step, zero, torch.zeros(B, 1), s, {}, SCHED, g,
                      callback=lambda a: calls.__setitem__("alone", calls["alone"] + 1))
    pool = TrajectoryPool(ddim_step, zero, SCHED, g, B, callback=lambda a: calls.__setitem__("pool", calls["pool"] + 1))
    for k, s in enumerate(starts):
        pool.submit(k, torch.zeros(B, 1), s, {})
        if k >= 2:  # two batches ahead, as the trainer keeps them
            pool.result(k - 2)
    for k in range(len(starts) - 2, len(starts)):
        pool.result(k)
    steps = sum(int((g.N - s).sum()) for s in starts)
    assert calls["pool"] <= steps / B + g.N  # full calls but for the tail
    assert calls["pool"] < 0.65 * calls["alone"]


def test_skip_inactive_loop_runs_each_sample_only_over_its_own_steps():
    g = Grid(1000, 10)
    evaluated = []
    eps_fn = lambda x, t, c: (evaluated.append(x.shape[0]), torch.zeros_like(x))[1]  # noqa: E731
    start = torch.tensor([0, 4, 9, 9])
    solve_to_zero(ddim_step, eps_fn, torch.randn(4, 1), start, {}, SCHED, g)
    assert sum(evaluated) == int((g.N - start).sum())
    evaluated.clear()
    solve_to_zero_reference(ddim_step, eps_fn, torch.randn(4, 1), start, {}, SCHED, g)
    assert sum(evaluated) == 4 * (g.N - int(start.min()))


def test_solver_state_stays_float32_with_half_precision_model():
    g = Grid(1000, 10)
    eps_fn = lambda x, t, c: (0.1 * x.half()).float()  # noqa: E731 - a half-precision "UNet"
    out = solve_to_zero(ddim_step, eps_fn, torch.randn(2, 4, dtype=torch.float16), torch.tensor([0, 5]), {}, SCHED, g)
    assert out.dtype == torch.float32


def _ctx(solver="heun", N=10, seed=0):
    teacher = GuidedEps(_cond_net(seed), w=3.0)
    student = _cond_net(seed + 1)
    return DistillContext(teacher, student, SOLVERS[solver], SCHED, Grid(1000, N))


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_direct_cm_target_equals_teacher_solve_per_sample(solver):
    ctx = _ctx(solver)
    B = 4
    x = torch.randn(B, 4, 3, 3)
    cond = {"prompt_embeds": torch.randn(B, 4), "text_embeds": torch.randn(B, 2), "time_ids": torch.ones(B, 6)}
    start = torch.tensor([2, 0, 9, 6])
    target = direct_cm_target(ctx, x, start, cond)
    for i in range(B):
        xi, n = x[i:i + 1].clone(), int(start[i])
        ci = {k: v[i:i + 1] for k, v in cond.items()}
        with torch.no_grad():
            for m in range(n, ctx.grid.N):
                t = ctx.grid.timestep(torch.tensor([m]))
                xi = ctx.step(ctx.teacher_eps, xi, t, t - ctx.grid.k, ci, SCHED)
        torch.testing.assert_close(target[i:i + 1], xi, rtol=1e-5, atol=1e-5)
    # The teacher reference sampler is the same code from index 0.
    torch.testing.assert_close(teacher_sample(ctx.step, ctx.teacher_eps, x, cond, SCHED, ctx.grid)[1:2],
                               target[1:2], rtol=1e-5, atol=1e-5)


def test_cm_target_is_one_teacher_step_then_student_consistency_fn():
    ctx = _ctx("ddim")
    B = 3
    x = torch.randn(B, 4, 3, 3)
    cond = {"prompt_embeds": torch.randn(B, 4), "text_embeds": torch.randn(B, 2), "time_ids": torch.ones(B, 6)}
    start = torch.tensor([0, 5, 9])  # the last interval lands on s = 0 where f(x, 0) = x
    target = cm_target(ctx, x, start, cond)
    t = ctx.grid.timestep(start)
    with torch.no_grad():
        x_s = ddim_step(ctx.teacher_eps, x, t, t - ctx.grid.k, cond, SCHED)
        expect = consistency_fn(ctx.student_eps_nograd, x_s, t - ctx.grid.k, cond, SCHED)
    torch.testing.assert_close(target, expect)
    torch.testing.assert_close(target[2], x_s[2])


def test_cfg_uses_zero_unconditional_embeddings():
    calls = []

    def eps_fn(x, t, cond):
        calls.append({k: v.clone() for k, v in cond.items()})
        return x * 0 + cond["prompt_embeds"].sum(dim=(1, 2)).view(-1, 1) + cond["time_ids"].sum(1, keepdim=True)

    cond = {"prompt_embeds": torch.randn(2, 3, 4), "text_embeds": torch.randn(2, 5), "time_ids": torch.rand(2, 6)}
    x = torch.zeros(2, 1)
    w = 9.0
    out = GuidedEps(eps_fn, w)(x, torch.tensor([5, 5]), cond)
    assert len(calls) == 2
    u = calls[1]
    assert torch.all(u["prompt_embeds"] == 0) and torch.all(u["text_embeds"] == 0)
    assert torch.equal(u["time_ids"], cond["time_ids"])
    eps_c, eps_u = eps_fn(x, None, cond), eps_fn(x, None, unconditional(cond))
    torch.testing.assert_close(out, eps_u + w * (eps_c - eps_u))
    torch.testing.assert_close(GuidedEps(eps_fn, w, batched=True)(x, torch.tensor([5, 5]), cond), out)


def test_distance_l2_and_pseudo_huber():
    a, b = torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0])
    assert distance(a, b, "l2").item() == pytest.approx(4.5)
    c = 0.001
    assert distance(a, b, "huber", c).item() == pytest.approx(((9 + c * c) ** 0.5 - c) / 2)


def test_one_step_student_sample_is_f_at_T_and_multistep_renoises():
    eps_fn = _cond_net(3)
    cond = {"prompt_embeds": torch.randn(2, 4)}
    g = Grid(1000, 100)
    x_T = torch.randn(2, 4, 3, 3)
    one = student_sample(eps_fn, x_T, cond, SCHED, g, 1)
    torch.testing.assert_close(one, consistency_fn(eps_fn, x_T, torch.full((2,), 1000), cond, SCHED))
    z = torch.randn(2, 4, 3, 3)
    _, outs = student_sample(eps_fn, x_T, cond, SCHED, g, 2, fresh_noise=lambda j: z, return_all=True)
    x_500 = SCHED.add_noise(outs[0], z, torch.full((2,), 500))
    torch.testing.assert_close(outs[1], consistency_fn(eps_fn, x_500, torch.full((2,), 500), cond, SCHED))
