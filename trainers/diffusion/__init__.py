"""Schedules, the Gaussian forward process and losses, and samplers."""
from trainers.diffusion.gaussian import GaussianDiffusion, LossTerms
from trainers.diffusion.sampling import sample
from trainers.diffusion.schedule import alphas_cumprod, betas_for, log_snr, snr

__all__ = ["GaussianDiffusion", "LossTerms", "sample", "alphas_cumprod", "betas_for", "log_snr", "snr"]
