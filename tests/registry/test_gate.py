"""dolly.registry.gate: the promotion gate and alias races (sqlite registry)."""
import threading

import mlflow
import pytest

from dolly import registry

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("tuned, base, champ, promote, why", [
    (0.8, 0.0, None, True, "no champion"),
    (0.0, 0.0, None, False, "does not beat base"),
    (0.1, 0.2, None, False, "does not beat base"),
    (0.5, 0.0, ("3", 0.8), False, "worse than champion v3"),
    (0.8, 0.0, ("3", 0.8), True, "not worse than champion v3"),
    (0.9, 0.0, ("3", None), True, "no recorded"),
    (None, 0.0, None, False, "lacks"),
])
def test_gate_decision(tuned, base, champ, promote, why):
    ok, reason = registry.gate_decision("exact_match", tuned, base, champ)
    assert ok is promote and why in reason


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One sqlite registry for the module (creating one costs seconds); a model name per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    return mlflow.MlflowClient(uri)


@pytest.fixture
def name(request):
    return "m-" + request.node.name.replace("[", "-").replace("]", "")


def versions(client, name, scores):
    """Registered versions (no artifacts needed) carrying tuned/exact_match tags."""
    client.create_registered_model(name)
    out = []
    for s in scores:
        mv = client.create_model_version(name, source="file:///nowhere",
                                         tags={"tuned/exact_match": str(s)})
        out.append(str(mv.version))
    return out


def test_promote_sets_alias(client, name):
    (v1,) = versions(client, name, [0.5])
    ok, holder = registry.promote(client, name, "champion", v1, 0.5, "exact_match", settle_s=0.01)
    assert ok and holder == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


def test_promote_gives_way_to_better_champion(client, name):
    v1, v2 = versions(client, name, [0.9, 0.5])
    client.set_registered_model_alias(name, "champion", v1)
    ok, holder = registry.promote(client, name, "champion", v2, 0.5, "exact_match", settle_s=0.01)
    assert not ok and holder == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


@pytest.mark.parametrize("scores, winner", [([0.9, 0.5], 0), ([0.5, 0.9], 1), ([0.7, 0.7], 1)])
def test_concurrent_promotions_agree_on_one_champion(client, name, scores, winner):
    vs = versions(client, name, scores)
    results = {}
    barrier = threading.Barrier(len(vs))

    def go(v, s):
        barrier.wait()
        results[v] = registry.promote(client, name, "champion", v, s, "exact_match", settle_s=0.2)

    threads = [threading.Thread(target=go, args=(v, s)) for v, s in zip(vs, scores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion == vs[winner]  # best score; a tie goes to the newer version
    assert [results[v][0] for v in vs] == [v == champion for v in vs]
