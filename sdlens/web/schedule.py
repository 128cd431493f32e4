"""The built-in model's sampler as numbers a web page can apply: DPM-Solver++ (2M) step by step.

diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``solver_type="midpoint"``, epsilon prediction, no thresholding) updates the latent ``x`` at step
``i`` from the clean-image estimates ``m0`` (this step's) and ``m1`` (the last step's) as a linear
combination:

    m0     = (x - sigma_i * eps) / alpha_i                 (the model's x0 estimate)
    x_next = A_i * x + B_i * m0 + C_i * m1

with ``C_i = 0`` on the first-order steps (the first, and the last when the schedule ends at
sigma 0). ``coefficients`` computes ``(timestep, alpha, sigma, A, B, C)`` per step from the
scheduler's own timesteps and sigmas, so a page needs no scheduler of its own; ``apply`` runs the
recurrence (the tests check it against the scheduler's ``step``).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import WebError


def _alpha_sigma(s: float) -> tuple[float, float]:
    """diffusers' ``_sigma_to_alpha_sigma_t`` for a variance-preserving schedule."""
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha


def _check(scheduler) -> None:
    cfg = scheduler.config
    wanted = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
              "prediction_type": "epsilon", "thresholding": False, "use_flow_sigmas": False}
    wrong = {k: cfg.get(k) for k, v in wanted.items() if cfg.get(k) != v}
    if type(scheduler).__name__ != "DPMSolverMultistepScheduler" or wrong:
        raise WebError(f"the web page samples with DPM-Solver++ (2M, midpoint, epsilon) only; this model's scheduler "
                         f"is {type(scheduler).__name__} with {wrong or cfg}")


def coefficients(scheduler, steps: int) -> dict[str, list[float]]:
    """Per step of a ``steps``-step run: ``timestep`` (the UNet's input), ``alpha``, ``sigma`` (of
    ``x`` at that step) and the update's ``A``, ``B``, ``C``."""
    _check(scheduler)
    scheduler.set_timesteps(steps)
    sig = [float(s) for s in scheduler.sigmas]  # steps + 1 values, the last the final sigma
    n = len(scheduler.timesteps)
    zero_final = scheduler.config.final_sigmas_type == "zero"
    out = {k: [] for k in ("timestep", "alpha", "sigma", "A", "B", "C")}
    for i in range(n):
        alpha_s, sigma_s = _alpha_sigma(sig[i])
        last = i == n - 1
        first_order = i == 0 or (last and (scheduler.config.euler_at_final or zero_final
                                           or (scheduler.config.lower_order_final and n < 15)))
        if sig[i + 1] == 0.0:  # lambda_t = +inf: the step lands on the clean estimate
            a_coef, b_coef, c_coef = 0.0, 1.0, 0.0
        else:
            alpha_t, sigma_t = _alpha_sigma(sig[i + 1])
            lam_t, lam_s = math.log(alpha_t) - math.log(sigma_t), math.log(alpha_s) - math.log(sigma_s)
            h = lam_t - lam_s
            a_coef = sigma_t / sigma_s
            phi = -alpha_t * (math.exp(-h) - 1.0)  # the weight of D0
            if first_order:
                b_coef, c_coef = phi, 0.0
            else:
                alpha_p, sigma_p = _alpha_sigma(sig[i - 1])
                r0 = (lam_s - (math.log(alpha_p) - math.log(sigma_p))) / h
                # x_t = A x + phi D0 + 0.5 phi D1, D0 = m0, D1 = (m0 - m1) / r0
                b_coef, c_coef = phi * (1.0 + 0.5 / r0), -0.5 * phi / r0
        for k, v in zip(out, (float(scheduler.timesteps[i]), alpha_s, sigma_s, a_coef, b_coef, c_coef)):
            out[k].append(v)
    return out


def apply(coef: dict[str, list[float]], x: np.ndarray, model, guidance: float | None = None) -> np.ndarray:
    """Run the recurrence from the initial noise ``x``; ``model(x, timestep)`` gives the noise
    estimate ``eps`` (guided already). Returns the final latent."""
    m_prev = None
    for i, t in enumerate(coef["timestep"]):
        eps = model(x, t)
        m0 = (x - coef["sigma"][i] * eps) / coef["alpha"][i]
        x = coef["A"][i] * x + coef["B"][i] * m0 + (coef["C"][i] * m_prev if coef["C"][i] else 0.0)
        m_prev = m0
    return x


__all__ = ["apply", "coefficients"]
