import numpy as np
import pytest

from qa_app.reject import FEATURES, Fusion, Rejector, features
from qa_app.retrieval.index import build_index, load_index, save_index, search


def unit_vectors(n, dim=32, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_index_kind_finds_a_vector_itself(kind):
    vectors = unit_vectors(2000)
    index = build_index(vectors, kind)
    scores, ids = search(index, vectors[:50], 5)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95
    assert np.allclose(scores[ids[:, 0] == np.arange(50), 0], 1.0, atol=1e-4)


def test_flat_index_is_exact_and_survives_save_and_load(tmp_path):
    vectors = unit_vectors(300)
    queries = unit_vectors(7, seed=1)
    index = build_index(vectors)
    save_index(index, tmp_path / "kb.faiss")
    scores, ids = search(load_index(tmp_path / "kb.faiss"), queries, 3)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :3]
    assert (ids == expected).all()


def test_unknown_index_kind_is_refused():
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(unit_vectors(10), "annoy")


def test_features_of_a_single_candidate_assume_a_wide_margin():
    f = features(np.array([3.0]), np.array([0.8]), np.array([1.5]), np.array([0.6]))
    assert f.tolist() == [3.0, 10.0, 0.8, 0.8, 1.5, 0.6]
    assert len(f) == len(FEATURES)


def test_rejector_learns_a_monotone_calibrated_confidence(tmp_path):
    rng = np.random.default_rng(0)
    good = np.column_stack([rng.normal(4, 1, 300), rng.normal(5, 1, 300), rng.normal(0.8, 0.05, 300),
                            rng.normal(0.8, 0.05, 300)])
    bad = np.column_stack([rng.normal(-2, 1, 300), rng.normal(1, 1, 300), rng.normal(0.5, 0.05, 300),
                           rng.normal(0.5, 0.05, 300)])
    rejector = Rejector.fit(np.vstack([good, bad]), np.r_[np.ones(300), np.zeros(300)], threshold=0.6)
    conf_good, conf_bad = rejector.confidence(good), rejector.confidence(bad)
    assert conf_good.min() >= 0 and conf_bad.max() <= 1
    assert (conf_good > 0.6).mean() > 0.95 and (conf_bad < 0.6).mean() > 0.95
    rejector.save(tmp_path, Fusion(np.array([1.0, 2.0, 3.0])), {"passage": "question"})
    again, fusion, record = Rejector.load(tmp_path)
    assert again.threshold == 0.6 and record["passage"] == "question"
    assert fusion.weights.tolist() == [1.0, 2.0, 3.0]
    assert np.allclose(again.confidence(good), conf_good)


def test_missing_calibration_says_how_to_fix_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-ranker"):
        Rejector.load(tmp_path)


def test_fusion_learns_which_signal_picks_the_right_candidate():
    rng = np.random.default_rng(0)
    lists, gold = [], []
    for _ in range(200):
        feats = rng.normal(size=(6, 3))
        g = int(rng.integers(6))
        feats[g, 1] += 2.0          # only the question cosine tells the gold apart
        lists.append(feats)
        gold.append(g)
    fusion = Fusion.fit(lists, gold)
    assert fusion.weights[1] > 3 * abs(fusion.weights[0]) and fusion.weights[1] > 3 * abs(fusion.weights[2])
    picked = [int(np.argmax(fusion.score(f))) for f in lists]
    oracle = [int(np.argmax(f[:, 1])) for f in lists]  # the best any rule can do here
    assert np.mean(np.array(picked) == np.array(gold)) >= np.mean(np.array(oracle) == np.array(gold)) - 0.01
