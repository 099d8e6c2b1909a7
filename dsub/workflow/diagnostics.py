"""Checks that the maps, poses, CTF and contrast fit the particles: before the long run and after it.

Before the run, one task fits the contrast of a sample of particles
(``sample_task``) and ``check_sample`` looks at it:

* with ``--scale input``, the input contrast must have the sign of the fit
  (else the run is refused: the images have the opposite polarity), and the
  fitted / input ratio should be near 1 (a warning when its median leaves
  0.8–1.25 by more than its noise);
* the model must explain the images better than a model that does not belong
  to them: each image is also fitted with the pose and origin of another
  sample particle (its own CTF and half map), and the fit correlation with its
  own pose must beat that control clearly (a paired t statistic over the
  sample, and a median gain), else a warning that the poses, CTF or maps
  probably do not belong to these particles;
* on an earlier dsub run's output (``check_earlier_contrast``) the fit is
  compared with the contrast that run used: maps that still hold the region it
  removed fit too low, and ``--scale fit`` would under-subtract (a warning
  naming ``--scale input``);
* few particles should fit a negative contrast (beyond what each fit's
  uncertainty explains) or an outlying one.

After the run ``check_results`` repeats the last two on every particle from the
store. Each finding is one ``dsub: warning:`` line (``dsub.errors.warn``); a
good input gives none. The figures go to ``dsub_run.json`` under
"diagnostics".
"""

from __future__ import annotations

import dataclasses
import math

import dask
import numpy as np

from ..errors import InputFileError, warn
from .tasks import fit_sample

SAMPLE_SIZE = 64
#: The fitted / input contrast ratio that passes without a warning.
RATIO_BAND = (0.8, 1.25)
#: Own-pose correlation must beat the control by this paired t statistic and median gain.
BELONGS_T, BELONGS_GAIN = 4.0, 1.5
#: |α - median| beyond this many robust standard deviations (1.4826 MAD) is an outlier.
OUTLIER_SIGMAS = 4.0
#: Warn when more than this fraction is outlying, or negative beyond the noise.
OUTLIER_FRACTION, NEGATIVE_EXCESS = 0.05, 0.10
#: On an earlier dsub run's output, a fitted / earlier contrast below this (beyond its noise) with --scale fit: a warning.
EARLIER_RATIO_FLOOR = 0.97
#: Fewer usable sample particles than this: the sample checks are not made.
MIN_SAMPLE = 8


def sample_rows(count: int) -> np.ndarray:
    """The rows of a table of ``count`` that the sample fit takes: up to ``SAMPLE_SIZE``, spread evenly, (m,) int."""
    return np.unique(np.linspace(0, count - 1, min(SAMPLE_SIZE, count)).astype(int))


def sample_task(table, maps, settings, device: str):
    """(sample row indices, a Dask task fitting α on them): ``sample_rows`` of the table."""
    sample = sample_rows(len(table))
    particles = dataclasses.replace(table.subset(sample), source=None)
    return sample, dask.delayed(fit_sample, pure=False)(
        particles, maps, dataclasses.replace(settings, scale="fit"), device, dask_key_name="sample-fit"
    )


def _median(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def contrast_spread(alpha, sigma) -> dict:
    """Negative and outlying fractions of fitted α (finite values only), and how many negatives noise explains.

    ``expected_negative_fraction`` is the mean over particles of P(α̂ < 0) if
    every true α were the median (normal errors of each σ); NaN σ counts 0.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    good = np.isfinite(alpha)
    alpha, sigma = alpha[good], sigma[good]
    if not alpha.size:
        return {"negative_fraction": None, "expected_negative_fraction": None, "outlier_fraction": None}
    median = float(np.median(alpha))
    robust = 1.4826 * float(np.median(np.abs(alpha - median)))
    outliers = np.abs(alpha - median) > OUTLIER_SIGMAS * robust if robust > 0 else np.zeros(alpha.size, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        chance = np.where(np.isfinite(sigma) & (sigma > 0), _normal_cdf(-abs(median) / sigma), 0.0)
    return {
        "negative_fraction": float(np.mean(alpha < 0)),
        "expected_negative_fraction": float(np.mean(chance)),
        "outlier_fraction": float(np.mean(outliers)),
    }


def warn_spread(figures: dict, where: str, scale: str) -> None:
    """Warnings for many negative or outlying fitted contrast scales (``figures`` from ``contrast_spread``)."""
    negative, expected = figures["negative_fraction"], figures["expected_negative_fraction"]
    if negative is not None and negative > 0.5:
        consequence = ("The subtraction is still right, because the fit absorbs the sign, but check the polarity "
                       "before refining." if scale == "fit" else
                       f"With --scale {scale} they are subtracted with the wrong sign: use --scale fit.")
        warn(f"{negative:.0%} of the fitted contrast scales {where} are negative: the images have the opposite "
             f"contrast to the maps (inverted stacks). {consequence}")
    elif negative is not None and negative > expected + NEGATIVE_EXCESS:
        warn(f"{negative:.0%} of the fitted contrast scales {where} are negative, where the fits' noise explains "
             f"{expected:.0%}: these particles match the maps poorly; check their poses and CTF, or leave them out.")
    outliers = figures["outlier_fraction"]
    if outliers is not None and outliers > OUTLIER_FRACTION:
        warn(f"{outliers:.0%} of the fitted contrast scales {where} are outliers (over {OUTLIER_SIGMAS:g} robust "
             "standard deviations from the median): check those particles' poses, CTF and images.")


def check_sample(table, sample: np.ndarray, result, scale: str, say, refuse_unexplained=None,
                 region_subtracted_before: bool = False) -> dict:
    """Check the sample fit ``result = (ContrastResult, control correlation, ...)`` (``tasks.SampleFit``) of rows ``sample``.

    Raises ``InputFileError`` when, with ``scale == "input"``, the input
    contrast has the opposite sign to the fit (unless the maps explain nothing
    of the images, when the fit's sign means nothing). Warns as the module says;
    calls ``say(line)`` with one line of figures. Returns the figures for
    ``dsub_run.json``. ``refuse_unexplained``: where given, a function of the
    evidence in words (``on 64 sample particles the maps explain almost
    nothing ...``) returning the error raised instead of the warning that the
    maps explain almost nothing (``validate.wrong_voxel_size``, for maps whose
    voxel size is off every optics group's). ``region_subtracted_before``: the
    earlier run that wrote these particles subtracted this region already
    (``chain.check_earlier_records``): an opposite sign is then put down to that.
    """
    fit, control = result[:2]
    usable = np.isfinite(fit.alpha) & np.isfinite(control)
    figures = {"particles": int(usable.sum()),
               "median_contrast": _median(fit.alpha),
               "median_fit_correlation": _median(fit.correlation),
               "median_abs_fit_correlation": _median(np.abs(fit.correlation)),
               "median_abs_control_correlation": _median(np.abs(control)),
               **contrast_spread(fit.alpha, fit.sigma)}
    own, other = figures["median_abs_fit_correlation"], figures["median_abs_control_correlation"]
    if usable.sum() >= MIN_SAMPLE:
        # Magnitudes: inverted images correlate as well as upright ones, with the opposite sign.
        gain = np.abs(fit.correlation[usable].astype(np.float64)) - np.abs(control[usable])
        spread = float(np.std(gain, ddof=1))
        t = float(np.mean(gain) / (spread / math.sqrt(gain.size))) if spread > 0 else math.copysign(
            math.inf, float(np.mean(gain)))
        figures["own_pose_t"] = t
        figures["maps_explain_images"] = bool(t >= BELONGS_T and own >= BELONGS_GAIN * max(other, 0.0))
        if not figures["maps_explain_images"] and refuse_unexplained is not None:
            raise refuse_unexplained(
                f"on {gain.size} sample particles the maps explain almost nothing of the images (fit correlation "
                f"magnitude with their own poses {own:.3f}, with other particles' poses {other:.3f})")
        if not figures["maps_explain_images"]:
            warn(f"the maps explain almost nothing of the images: on {gain.size} sample particles the fit "
                 f"correlation with their own poses (median magnitude {own:.3f}) is no better than with other "
                 f"particles' poses ({other:.3f}). The poses, CTF or maps probably do not belong to these "
                 "particles: check that the metadata comes from a refinement against these maps and images.")
    explained = figures.get("maps_explain_images", True)
    earlier = (table.extra.get("dsub_output") if table is not None and table.input_contrast is not None
               else None)
    if table is not None and table.source_format == "star" and earlier != "rlnDsubContrast":
        earlier = None  # an earlier --scale none run wrote no contrast: nothing to compare with
    if scale == "input":
        figures.update(check_input_contrast(table, sample[usable], fit.alpha[usable], fit.sigma[usable], say,
                                            check_sign=explained, check_ratio=earlier is None,
                                            region_subtracted_before=region_subtracted_before))
    if earlier is not None and scale in ("fit", "input") and explained:
        figures.update(check_earlier_contrast(table, sample[usable], fit.alpha[usable], fit.sigma[usable], scale, say))
    elif scale == "none" and explained:
        figures.update(check_unit_contrast(fit.alpha[usable], fit.sigma[usable]))
    if explained:  # otherwise the spread of α only repeats that warning
        warn_spread(figures, "of the sample", scale)
    if usable.any():
        say(f"Sample fit on {usable.sum()} particles: median contrast {figures['median_contrast']:.3f}, fit "
            f"correlation magnitude {own:.3f} (with other particles' poses: {other:.3f}).")
    return _json_safe(figures)


def _json_safe(figures: dict) -> dict:
    """Infinite or NaN figures as None, so dsub_run.json stays strict JSON."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in figures.items()}


def check_input_contrast(table, rows: np.ndarray, fitted: np.ndarray, sigma: np.ndarray, say,
                         check_sign: bool = True, check_ratio: bool = True,
                         region_subtracted_before: bool = False) -> dict:
    """With --scale input: refuse the opposite polarity; warn when fitted / input leaves ``RATIO_BAND``
    (unless ``check_ratio`` is false: an earlier dsub run's output, judged by ``check_earlier_contrast``).
    ``region_subtracted_before``: the refusal names the earlier subtraction of this region as the cause (what
    it left of the region fits the full map with any sign), not the stacks' polarity."""
    given = np.asarray(table.input_contrast[rows], dtype=np.float64)
    if not rows.size:
        return {}
    given_sign, measured_sign = np.sign(np.median(given)), np.sign(np.median(fitted))
    if check_sign and given_sign != measured_sign:
        found = (f"the input contrast scales are {'positive' if given_sign > 0 else 'negative'} but a fit on "
                 f"{rows.size} particles finds them {'positive' if measured_sign > 0 else 'negative'}: ")
        if region_subtracted_before:
            raise InputFileError(
                table.source_path,
                found + "this mask's region was already subtracted from these images (see the warning above), so "
                "the full map no longer matches them.",
                "Give the mask of the region still to be removed, or start from the particles before that "
                "subtraction.")
        raise InputFileError(
            table.source_path, found + "the images have the opposite polarity to what the metadata implies.",
            "Use --scale fit (it absorbs the polarity), or check the stacks' contrast inversion.")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = fitted / given
        ratio_sigma = np.abs(sigma / given)
    finite = np.isfinite(ratio)
    median_ratio = float(np.median(ratio[finite])) if finite.any() else math.nan
    # Standard error of a median: sqrt(pi/2) times that of a mean.
    noise = math.sqrt(math.pi / 2) * float(np.sqrt(np.nanmean(ratio_sigma[finite] ** 2) / max(finite.sum(), 1)))
    low, high = RATIO_BAND
    if check_ratio and not low <= median_ratio <= high and abs(median_ratio - 1.0) > 3 * noise:
        warn(f"the fitted contrast is {median_ratio:.2f} times the input contrast (median of {finite.sum()} "
             f"sample particles, ± {noise:.2f}): the input contrast does not match these maps and images. "
             "Check that the metadata and maps come from the same refinement, or use --scale fit.")
    if check_sign:
        say(f"Polarity check: input contrast has the sign of a fit on {rows.size} particles "
            f"(median fitted {np.median(fitted):.3f}, median input {np.median(given):.3f}).")
    return {"median_ratio_fitted_to_input": median_ratio, "median_ratio_noise": noise}


def check_earlier_contrast(table, rows: np.ndarray, fitted: np.ndarray, sigma: np.ndarray, scale: str, say) -> dict:
    """On the output of an earlier dsub run (``extra["dsub_output"]``): the sample's fitted contrast against the
    contrast that run subtracted with (``input_contrast``: ``rlnDsubContrast`` / ``alignments3D/alpha``).

    Those images lack the region the earlier run removed. Maps that still hold
    it (the earlier run's) predict more than the images hold, so the fit against
    the full half map comes out that region's share of the fitted signal too
    low, and ``--scale fit`` leaves as large a share of this run's region in the
    images: a warning naming ``--scale input``, which reuses the earlier
    contrast (the same particles, the same contrast). Maps refined from the
    subtracted particles fit about 1 times it, and ``--scale fit`` is right
    with them. With ``--scale input`` a ratio below 1 is what these maps give:
    one line saying so, not the warning ``check_input_contrast`` gives.
    """
    given = np.asarray(table.input_contrast[rows], dtype=np.float64)
    if not rows.size:
        return {}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(fitted, np.float64) / given
        ratio_sigma = np.abs(np.asarray(sigma, np.float64) / given)
    finite = np.isfinite(ratio)
    if not finite.any():
        return {}
    median_ratio = float(np.median(ratio[finite]))
    # Standard error of a median: sqrt(pi/2) times that of a mean.
    noise = math.sqrt(math.pi / 2) * float(np.sqrt(np.nanmean(ratio_sigma[finite] ** 2) / finite.sum()))
    label = "alignments3D/alpha" if table.source_format == "cs" else "rlnDsubContrast"
    source = getattr(table.source_path, "name", table.source_path)
    lacking = median_ratio < EARLIER_RATIO_FLOOR and 1.0 - median_ratio > 3 * noise
    versus = (f"{median_ratio:.2f} times the contrast an earlier dsub run subtracted these particles with ({label} "
              f"of {source}; median of {finite.sum()} sample particles, ± {noise:.2f})")
    if scale == "fit" and lacking:
        warn(f"the contrast fitted against the full half maps is {versus}: the maps still hold the region that run "
             f"removed (as its own maps do), so this fit is too low and would leave about {1 - median_ratio:.0%} of this mask's region "
             "in the images. Use --scale input, which reuses the earlier run's contrast (the same particles); "
             "--scale fit is right only with maps refined from the subtracted particles.")
    elif scale == "input" and median_ratio > RATIO_BAND[1] and median_ratio - 1.0 > 3 * noise:
        warn(f"the fitted contrast is {versus}: more than these images hold. Check that the maps are the ones "
             "the earlier run subtracted with, or use --scale fit.")
    elif scale == "input" and lacking:
        say(f"The fitted contrast is {versus}, as expected where the maps still hold the region that run removed: "
            "--scale input reuses the earlier contrast.")
    else:
        say(f"The fitted contrast is {versus}: the maps hold what the images hold.")
    # Recorded so that a --scale input run on this run's output can tell its contrast was fitted low (``chain``).
    return {"median_ratio_fitted_to_earlier": median_ratio, "median_ratio_earlier_noise": noise,
            "fit_below_earlier": bool(lacking)}


def check_unit_contrast(fitted: np.ndarray, sigma: np.ndarray) -> dict:
    """With --scale none (every particle subtracted with α = 1): warn when the sample's fitted contrast
    leaves ``RATIO_BAND`` by more than its noise, as ``check_input_contrast`` does for input contrasts."""
    fitted, sigma = np.asarray(fitted, np.float64), np.asarray(sigma, np.float64)
    finite = np.isfinite(fitted) & np.isfinite(sigma)
    if not finite.any():
        return {}
    median = float(np.median(fitted[finite]))
    # Standard error of a median: sqrt(pi/2) times that of a mean.
    noise = math.sqrt(math.pi / 2) * float(np.sqrt(np.mean(sigma[finite] ** 2) / finite.sum()))
    low, high = RATIO_BAND
    if median > 0 and not low <= median <= high and abs(median - 1.0) > 3 * noise:  # negative: warned as such
        warn(f"the fitted contrast is {median:.2f} (median of {finite.sum()} sample particles, ± {noise:.2f}), but "
             f"--scale none subtracts every particle with 1: {1 / median:.2f}× the masked signal these images "
             "hold. Use "
             "--scale fit, or check that the maps are on the images' scale.")
    return {"median_ratio_fitted_to_input": median, "median_ratio_noise": noise}


def check_results(per_particle: dict, skipped: np.ndarray, scale: str, sample: dict | None) -> dict:
    """Figures of every particle's stored fit (``store.per_particle``), with the same warnings as the sample.

    The negative and outlier checks apply to fitted contrast (``scale ==
    "fit"``); the fit correlation is checked against the sample's control.
    """
    kept = ~np.asarray(skipped, dtype=bool)
    alpha = per_particle["contrast"][kept]
    sigma = per_particle["contrast_sigma"][kept]
    correlation = per_particle["fit_correlation"][kept]
    figures = {"particles": int(kept.sum()), "median_fit_correlation": _median(correlation),
               "median_abs_fit_correlation": _median(np.abs(correlation)),
               "median_contrast": _median(alpha), "median_contrast_sigma": _median(sigma)}
    already_said = not (sample or {}).get("maps_explain_images", True)
    if scale == "fit":
        figures.update(contrast_spread(alpha, sigma))
        if not already_said:
            warn_spread(figures, "of all particles", scale)
    control = (sample or {}).get("median_abs_control_correlation")
    own = figures["median_abs_fit_correlation"]
    if own is not None and control is not None and own < BELONGS_GAIN * max(control, 0.0) and not already_said:
        warn(f"the maps explain almost nothing of the images: the median fit correlation magnitude of all particles "
             f"({own:.3f}) is no better than the sample's with other particles' poses ({control:.3f}). The "
             "poses, CTF or maps probably do not belong to these particles.")
    return _json_safe(figures)
