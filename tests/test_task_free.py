"""Task-free prediction's state (`pah_edge.task_free`, `pah-edge task-stats`) and its guarantees.

Order-free and exactly removable statistics, old tasks untouched by a new one, bundles exported
before the statistics existed, and a corrupt task or shared state.
"""

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, file_tree, run_cli, write_image_folder
from tiny_bundle import QUERY_FILES, make_tiny_bundle, query_folder

from pah_edge.bundle import Bundle
from pah_edge.device.learner import learn_task
from pah_edge.device.predict import Predictor
from pah_edge.task_free import SHRINKAGE, SharedStats, TaskFreeRule, task_stats, transform, workstation_stats


@pytest.fixture(scope="module")
def made(tmp_path_factory, mnist_digits):
    root = tmp_path_factory.mktemp("task_free")
    new_task = write_image_folder(root / "new", mnist_digits, {"pairs": [1, 7]}, per_class=12) / "pairs"
    labelled = write_image_folder(root / "labelled", mnist_digits,
                                  {"a": [0, 1, 2], "b": [3, 4, 5], "c": [6, 7, 8, 9]}, per_class=10)
    return make_tiny_bundle(root, mnist_digits), query_folder(root, mnist_digits), new_task, labelled, root


@pytest.fixture
def bundle_dir(made, tmp_path):
    return shutil.copytree(made[0], tmp_path / "bundle")


def _predict(bundle_dir, query, **kw):
    with Predictor(Bundle.open(bundle_dir), runtime="onnxruntime-cpu") as predictor:
        return predictor.predict([query], **kw)


def test_the_rule_does_not_depend_on_the_order_tasks_were_learned_in():
    rng = np.random.default_rng(0)
    dim = 16
    base = [(rng.random((40, dim)), np.repeat([0, 1], 20), 2)]
    shared, _ = workstation_stats(base)
    tasks = []
    for t in range(3):
        labels = np.repeat(np.arange(3), 10)
        feats = rng.random((30, dim)) + labels[:, None] * rng.random(dim)
        tasks.append((f"t{t}", task_stats(feats, labels, 3)))
    query = rng.random((8, dim))
    scores, novelty = TaskFreeRule(shared, tasks).scores(query)
    order = [2, 0, 1]
    permuted_scores, permuted_novelty = TaskFreeRule(shared, [tasks[i] for i in order]).scores(query)
    columns = np.concatenate([np.arange(3 * i, 3 * i + 3) for i in order])
    np.testing.assert_allclose(permuted_scores, scores[:, columns], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(permuted_novelty, novelty, rtol=1e-5, atol=1e-5)


def test_scores_and_novelty_are_the_discriminant_and_the_nearest_mahalanobis_distance():
    # The definitions in float64 from the shrunk covariance; the rule computes them with one float32
    # product per batch.
    rng = np.random.default_rng(2)
    dim = 24
    shared, _ = workstation_stats([(rng.random((60, dim)), np.repeat([0, 1, 2], 20), 3)])
    labels = np.repeat(np.arange(4), 8)
    stats = task_stats(rng.random((32, dim)) + labels[:, None] * rng.random(dim), labels, 4)
    other = task_stats(rng.random((20, dim)), np.repeat([0, 1], 10), 2)
    rule = TaskFreeRule(shared, [("t", stats), ("u", other)])
    covariance = (shared.scatter + stats.scatter() + other.scatter()) / (shared.count + 52)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / dim * np.eye(dim)
    precision = np.linalg.inv(covariance)
    means = np.concatenate([stats.means, other.means]) - shared.mean
    query = rng.random((5, dim))
    z = transform(query, shared.mean)
    offsets = z[:, None] - means  # [N, K, D]
    distances = np.einsum("nkd,de,nke->nk", offsets, precision, offsets) / dim
    expected = z @ precision @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, precision, means)
    scores, novelty = rule.scores(query)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(novelty, distances.min(axis=1), rtol=1e-4)
    np.testing.assert_allclose(rule.scores(query, task=1)[1], distances[:, 4:].min(axis=1), rtol=1e-4)


@pytest.mark.parametrize("images", [30, 200])  # fewer images than dimensions (the Gram route), and more
def test_task_statistics_keep_the_scatters_top_directions_and_the_rest_as_a_residual(images):
    from pah_edge.task_free import class_means, transform, within_scatter

    features, labels = np.random.default_rng(3).random((images, 64)), np.arange(images) % 5
    stats = task_stats(features, labels, 5)
    z = transform(features)
    values, vectors = np.linalg.eigh(within_scatter(z, labels, class_means(z, labels, 5)[0]))
    top = vectors[:, -5:] * np.sqrt(values[-5:])
    np.testing.assert_allclose(stats.factor.T @ stats.factor, top @ top.T, atol=1e-9)
    assert stats.residual == pytest.approx(values[:-5].clip(0).sum() / 64, rel=1e-6)


def test_task_statistics_cost_at_most_c_times_d_floats():
    features, labels = np.random.default_rng(1).random((50, 64)), np.repeat(np.arange(5), 10)
    stats = task_stats(features, labels, 5)
    assert stats.means.shape == stats.factor.shape == (5, 64)
    assert len(stats.to_bytes()) <= 5 * 64 * 4 + 1200  # C x D float32 plus the npz headers of 4 arrays


def test_learn_task_leaves_old_tasks_bit_identical_and_remove_restores_the_rule_exactly(bundle_dir, made):
    query, new_task = made[1], made[2]
    bundle = Bundle.open(bundle_dir)
    old_files = {f.name: f.read_bytes() for f in (bundle_dir / "tasks").iterdir() if f.name != "registry.json"}
    before = _predict(bundle_dir, query)
    # Task given: the head's answer stays bit-identical; novelty is measured under the covariance of
    # every task, so it moves as the bundle learns.
    def decided(task):
        return [(p["task"], p["label"], p["confidence"]) for p in _predict(bundle_dir, query, task=task)]

    given = {t: decided(t) for t in ("a", "b", "c")}

    learn_task(bundle, new_task, runtime="onnxruntime-cpu", progress=False)
    assert bundle.task("pairs").stats_file is not None
    assert {n: (bundle_dir / "tasks" / n).read_bytes() for n in old_files} == old_files
    assert {t: decided(t) for t in ("a", "b", "c")} == given
    assert any(p["task"] == "pairs" for p in _predict(bundle_dir, query, novelty_threshold=1e9)) or \
        _predict(bundle_dir, query) != before  # the new task takes part

    bundle.remove_task("pairs")
    after = _predict(bundle_dir, query)
    assert [(p["task"], p["label"], p["known"]) for p in after] == [(p["task"], p["label"], p["known"]) for p in before]
    np.testing.assert_allclose([p["novelty"] for p in after], [p["novelty"] for p in before], rtol=1e-5)
    assert not list((bundle_dir / "tasks").glob("pairs*"))


def _as_if_exported_before_the_statistics(bundle_dir):
    for file in bundle_dir.glob("task_free*"):
        file.unlink()
    registry = json.loads((bundle_dir / "tasks" / "registry.json").read_text())
    for task in registry["tasks"]:
        (bundle_dir / task.pop("stats_file")).unlink()
        task.pop("stats_sha256")
    (bundle_dir / "tasks" / "registry.json").write_text(json.dumps(registry))


@pytest.mark.parametrize("source", ["images", "checkpoint"])
def test_an_old_bundle_names_the_command_that_adds_the_statistics(bundle_dir, made, source):
    query, labelled, root = made[1], made[3], made[4]
    _as_if_exported_before_the_statistics(bundle_dir)
    assert_one_line_error(run_cli("predict", query, "--bundle", bundle_dir), "no task-free statistics",
                    f"pah-edge task-stats {bundle_dir}", "--task NAME")
    assert run_cli("predict", query, "--bundle", bundle_dir, "--task", "a").exit_code == 0  # task given: as before

    fix = ["--images", labelled] if source == "images" else ["--checkpoint", root / "run"]
    result = run_cli("task-stats", bundle_dir, *fix, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "novelty threshold" in result.stdout
    predictions = json.loads(run_cli("predict", query, "--bundle", bundle_dir, "--json").stdout)
    assert len(predictions) == len(QUERY_FILES)
    with_stats = {r.name for r in Bundle.open(bundle_dir).tasks() if r.stats_file}
    assert with_stats == ({"a", "b", "c"} if source == "images" else {"a", "b"})  # c was learned on a device


def test_task_stats_needs_exactly_one_source(bundle_dir, tmp_path):
    assert_one_line_error(run_cli("task-stats", bundle_dir), "--checkpoint RUN_DIR", "--images")
    (tmp_path / "other" / "x").mkdir(parents=True)
    assert_one_line_error(run_cli("task-stats", bundle_dir, "--images", tmp_path / "other"), "no folder named after a task")


def _subset(labelled, dest, tasks, per_class):
    """``dest/<task>/<class>/`` with the first ``per_class`` images of each class of ``tasks``."""
    for task in tasks:
        for folder in (labelled / task).iterdir():
            (dest / task / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:per_class]:
                shutil.copy(image, dest / task / folder.name / image.name)
    return dest


def test_task_stats_for_some_tasks_refuses_to_drop_the_scatter_of_the_others(bundle_dir, made, tmp_path):
    before = file_tree(bundle_dir, lock=False)
    only_c = _subset(made[3], tmp_path / "only_c", ["c"], per_class=10)  # a and b live in the shared state
    assert_one_line_error(run_cli("task-stats", bundle_dir, "--images", only_c, "--no-progress"),
                          "task(s) a, b would lose their task-free statistics", "give their images too")
    assert file_tree(bundle_dir, lock=False) == before
    # c, learned on the device, carries its own scatter: the shared state may be rebuilt without it.
    result = run_cli("task-stats", bundle_dir, "--images", _subset(made[3], tmp_path / "ab", "ab", 10), "--no-progress")
    assert result.exit_code == 0, result.output
    assert len(json.loads(run_cli("predict", made[1], "--bundle", bundle_dir, "--json").stdout)) == len(QUERY_FILES)


@pytest.mark.parametrize(("per_class", "words"), [
    (1, ["no image is left to set the novelty threshold on", "at least 3 images"]),
    (2, ["no variation within a class", "at least 3 images"]),  # one held out of each two, one left to fit
])
def test_task_stats_on_too_few_images_is_a_one_line_error(bundle_dir, made, tmp_path, per_class, words):
    before = file_tree(bundle_dir, lock=False)
    few = _subset(made[3], tmp_path / "few", "abc", per_class)
    assert_one_line_error(run_cli("task-stats", bundle_dir, "--images", few, "--no-progress"), *words)
    assert file_tree(bundle_dir, lock=False) == before
    result = run_cli("task-stats", bundle_dir, "--images", _subset(made[3], tmp_path / "three", "abc", 3),
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert "of 10 held-out images" in result.stdout  # one of each class's three


@pytest.mark.parametrize("damaged", ["statistics", "prototypes"])
def test_a_corrupt_task_is_left_out_with_one_warning_and_the_others_answer(bundle_dir, made, caplog, damaged):
    query = made[1]
    record = Bundle.open(bundle_dir).task("b")
    stats_file = bundle_dir / (record.stats_file if damaged == "statistics" else record.file)
    data = stats_file.read_bytes()
    stats_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with caplog.at_level(logging.WARNING, "pah_edge"):
        predictions = _predict(bundle_dir, query, novelty_threshold=1e9)
    assert {p["task"] for p in predictions} <= {"a", "c"} and len(predictions) == len(QUERY_FILES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fix = "pah-edge task-stats" if damaged == "statistics" else "learn task 'b' again"
    assert len(warnings) == 1 and "task 'b'" in warnings[0] and fix in warnings[0]
    result = run_cli("predict", query, "--bundle", bundle_dir)
    assert result.exit_code == 0 and "Traceback" not in result.output
    verified = run_cli("verify", bundle_dir)  # lists every task's state; a task that cannot answer fails it
    assert "task a: ok" in verified.stdout and "task c: ok" in verified.stdout
    if damaged == "statistics":
        assert verified.exit_code == 0 and "task b: task given only: " in verified.stdout
    else:
        assert verified.exit_code == 1 and "task b: UNAVAILABLE: " in verified.stdout
        assert "task(s) b unavailable" in verified.stderr


def test_a_corrupt_shared_state_is_one_line_and_exit_1(bundle_dir, made):
    shared = bundle_dir / json.loads((bundle_dir / "task_free.json").read_text())["file"]
    shared.write_bytes(b"garbage")
    assert_one_line_error(run_cli("predict", made[1], "--bundle", bundle_dir), "does not match its SHA-256",
                    "pah-edge task-stats")


def test_shared_stats_round_trip_through_their_bytes():
    rng = np.random.default_rng(2)
    shared = SharedStats(rng.random(4), rng.random((4, 4)), 7, 1.5, 0.05)
    import io

    with np.load(io.BytesIO(shared.to_bytes())) as npz:
        back = SharedStats.from_npz(npz)
    np.testing.assert_allclose(back.scatter, shared.scatter, rtol=1e-6)
    assert (back.count, back.threshold, back.unknown_rate) == (7, 1.5, 0.05)
