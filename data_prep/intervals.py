"""HR/PR/QRS/QT extractor: R peaks on lead II; the QRS onset and offset from the spatial velocity of the median beat
over all 8 leads (a global measurement, like the 12SL program's); P onsets and T offsets per beat from neurokit2's
`prominence` delineator on a few leads, impossible beats rejected, medians per lead, agreement across leads.
A value that cannot be measured reliably is NaN and `label_note` says why.

neurokit2's `dwt` delineator is not used: it puts the QRS onset on the P wave in about a third of beats
(shared/ENVIRONMENT.md), and `prominence` is ten times faster. The `prominence` R onset/offset are the Q and S
troughs, not the QRS boundaries, hence the median-beat QRS. QRS_THRESHOLD and P_BASE_MS were chosen by comparing
the embedded sample and generated DeepFake ECGs with the published distributions (bench/intervals.py), so that
comparison calibrates them as much as it validates them.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.signal import resample_poly

from data_prep.constants import LEADS, TARGETS

RHYTHM_LEAD = "II"
DELINEATE_LEADS = ("I", "II", "V5", "V6")  # leads where P and T are usually upright
BOUNDS = {"rr": (250.0, 2500.0), "pr": (60.0, 400.0), "qrs": (40.0, 240.0), "qt": (200.0, 650.0)}  # ms
MIN_BEATS = 3        # accepted beats a lead (or the median beat) needs
MIN_LEADS = 2        # leads that must agree for a record value
AGREE_MS = {"pr": 40.0, "qt": 60.0}  # a lead agrees when within this of the median over leads
TEMPLATE_RATE = 500  # the median beat is built at this rate (2 ms steps)
QRS_WINDOW_MS = (200, 250)  # median beat: ms before and after the R peak
QRS_THRESHOLD = 0.08  # QRS boundary: spatial velocity falls below this fraction of its peak above baseline
P_BASE_MS = 120  # window in which neurokit looks for the P wave's bases: its 100 ms default cuts off long P waves


def measure(ecg: np.ndarray, rate: int) -> dict[str, float | str]:
    """Measure one ECG (8, L) in mV, leads in LEADS order: hr (bpm), pr, qrs, qt (ms) and `label_note`
    (empty, or why a value is NaN)."""
    import neurokit2 as nk

    out: dict[str, float | str] = {t: np.nan for t in TARGETS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            clean = np.stack([nk.ecg_clean(x, sampling_rate=rate) for x in ecg])
            rpeaks = np.asarray(nk.ecg_peaks(clean[LEADS.index(RHYTHM_LEAD)], sampling_rate=rate)[1]["ECG_R_Peaks"],
                                dtype=int)
        except Exception as e:  # neurokit raises on flat or very short signals
            return {**out, "label_note": f"no R peaks ({type(e).__name__})"}
        rr = np.diff(rpeaks) * 1000.0 / rate
        rr = rr[(rr >= BOUNDS["rr"][0]) & (rr <= BOUNDS["rr"][1])]
        if len(rr) < MIN_BEATS - 1:
            return {**out, "label_note": f"{len(rpeaks)} R peaks, {len(rr)} plausible RR intervals: too few"}
        out["hr"] = 60000.0 / float(np.median(rr))
        qrs_on, qrs_off = _qrs_bounds(clean, rpeaks, rate)
        if not BOUNDS["qrs"][0] <= qrs_off - qrs_on <= BOUNDS["qrs"][1]:
            return {**out, "label_note": f"qrs: median beat gives {qrs_off - qrs_on:.0f} ms, out of range"}
        out["qrs"] = qrs_off - qrs_on
        per_lead: dict[str, list[float]] = {"pr": [], "qt": []}
        inner = rpeaks[1:-1]  # edge beats are cut off, and neurokit drops fiducials at index 0, misaligning beats
        for lead in DELINEATE_LEADS:
            try:
                waves = nk.ecg_delineate(clean[LEADS.index(lead)], inner, sampling_rate=rate, method="prominence",
                                         max_p_basepoint_interval=P_BASE_MS)[1]
            except Exception:
                continue
            for t, v in _lead_medians(waves, inner, rate, qrs_on, float(np.median(rr))).items():
                per_lead[t].append(v)
    notes = []
    for t, values in per_lead.items():
        out[t], note = _agree(t, np.array(values, dtype=float))
        if note:
            notes.append(note)
    return {**out, "label_note": "; ".join(notes)}


def _qrs_bounds(clean: np.ndarray, rpeaks: np.ndarray, rate: int) -> tuple[float, float]:
    """QRS onset and offset in ms relative to the R peak, from the spatial velocity of the median beat."""
    factor = TEMPLATE_RATE // rate
    up = resample_poly(clean, factor, 1, axis=1) if factor > 1 else clean
    pre, post = (ms * TEMPLATE_RATE // 1000 for ms in QRS_WINDOW_MS)
    centres = rpeaks * factor
    centres = centres[(centres >= pre) & (centres + post < up.shape[1])]
    if len(centres) < MIN_BEATS:
        return np.nan, np.nan
    template = np.median(np.stack([up[:, c - pre:c + post] for c in centres]), axis=0)
    velocity = np.convolve(np.sqrt((np.diff(template, axis=1) ** 2).sum(0)), np.ones(5) / 5, mode="same")
    near = 25 * TEMPLATE_RATE // 1000 * 2  # the QRS peak velocity lies within 50 ms of the R peak
    peak = pre - near + int(np.argmax(velocity[pre - near:pre + near]))
    base = np.percentile(velocity, 10)
    below = velocity < base + QRS_THRESHOLD * (velocity[peak] - base)
    onset = peak - int(np.argmax(below[:peak][::-1]))
    offset = peak + int(np.argmax(below[peak:]))
    ms = 1000.0 / TEMPLATE_RATE
    return (onset - pre) * ms, (offset - pre) * ms


def _lead_medians(waves: dict, rpeaks: np.ndarray, rate: int, qrs_on: float, rr_ms: float) -> dict[str, float]:
    """Per-beat PR and QT of one lead (fiducials relative to each R peak, the QRS onset from the median beat),
    impossible beats rejected, then the median over beats (NaN if too few)."""
    keys = ("ECG_P_Onsets", "ECG_P_Offsets", "ECG_T_Offsets")
    if any(len(waves.get(k, [])) != len(rpeaks) for k in keys):
        return {"pr": np.nan, "qt": np.nan}
    rel = {k: (np.asarray(waves[k], dtype=float) - rpeaks) * 1000.0 / rate for k in keys}
    p_on, p_off, t_off = rel.values()
    with np.errstate(invalid="ignore"):
        beats = {"pr": np.where(p_off <= qrs_on, qrs_on - p_on, np.nan),  # P must end before the QRS starts
                 "qt": np.where(t_off - qrs_on < rr_ms, t_off - qrs_on, np.nan)}  # T must end before the next beat
    medians = {}
    for t, v in beats.items():
        lo, hi = BOUNDS[t]
        v = v[(v >= lo) & (v <= hi)]
        medians[t] = float(np.median(v)) if len(v) >= MIN_BEATS else np.nan
    return medians


def _agree(target: str, values: np.ndarray) -> tuple[float, str]:
    """The median of the leads that agree with the median over leads, or NaN and why."""
    values = values[np.isfinite(values)]
    if len(values) < MIN_LEADS:
        return np.nan, f"{target}: {len(values)} leads with {MIN_BEATS}+ plausible beats"
    agreeing = values[np.abs(values - np.median(values)) <= AGREE_MS[target]]
    if len(agreeing) < MIN_LEADS:
        return np.nan, f"{target}: leads disagree ({', '.join(f'{v:.0f}' for v in values)} ms)"
    return float(np.median(agreeing)), ""


def drop_outliers(labels: pd.DataFrame, sd: float = 3.0) -> pd.DataFrame:
    """The study's outlier rule: set a target to NaN where |x - median| > sd * SD over the dataset, noting why."""
    labels = labels.copy()
    for t in TARGETS:
        bad = (labels[t] - labels[t].median()).abs() > sd * labels[t].std()
        note = labels.loc[bad, "label_note"]
        labels.loc[bad, "label_note"] = note.where(note == "", note + "; ") + f"{t}: outlier > {sd:g} SD"
        labels.loc[bad, t] = np.nan
    return labels
