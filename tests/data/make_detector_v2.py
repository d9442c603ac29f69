"""Writes tests/data/detector_v2.npz and detector_v2_next.npz: a Detector state of format version 2
and the next batch's results, both made by streamgmm as of commit 384574f. Run from a checkout of
that commit (`PYTHONPATH=<checkout> python tests/data/make_detector_v2.py STATE NEXT`); kept to
show how the fixture of test_detector.py::test_a_version_2_state_loads_and_carries_on was made."""
import sys

import numpy as np


def main(state_path: str, next_path: str) -> None:
    from streamgmm import detector as D
    from streamgmm.detector import Detector

    assert D._STATE_VERSION == 2, D.__file__
    rng = np.random.default_rng(7)
    det = Detector(n_components=1, warmup_events=400, false_alarm_rate=0.01, random_state=0,
                   adoption_persistence=400, feature_names=["a", "b"])
    old = rng.normal([0, 0], [1, 1], (1200, 2))
    new = rng.normal([6, 6], [1, 1], (1600, 2))
    X = np.vstack([old, np.where(rng.random((1600, 1)) < 0.5, new, rng.normal(0, 1, (1600, 2)))])
    for b in np.array_split(X, len(X) // 100):
        det.process(b)
        if det._boost_remaining > 0 and det._boost_remaining < 300:
            break  # save during the faster forgetting that follows an adoption
    print("adoptions", det.n_adoptions, "shifts", det.n_shifts, "boost", det._boost_remaining,
          "min_step", det.model.min_step, "buffer", det._flagged_X.shape, file=sys.stderr)
    det.save(state_path)
    nxt = np.vstack([rng.normal(0, 1, (150, 2)), rng.normal(6, 1, (50, 2)), [[20.0, -20.0]]])
    nxt[3, 1] = np.nan
    res = det.process(nxt)
    np.savez(next_path, X=nxt, score=res.score, is_anomaly=res.is_anomaly,
             typical=res.typical_score, n_adoptions=det.n_adoptions, n_shifts=det.n_shifts,
             min_step=det.model.min_step)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
