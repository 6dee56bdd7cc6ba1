"""Apache Kafka's version and production settings agree everywhere: the jars the tests, drills and benchmarks run
(deploy/kafka/pom.xml, farmesh/dev/kafka.py), compose.yaml's image, the Kubernetes cluster (deploy/k8s/kafka,
Strimzi), and the topics' configs the code sets when it creates them (schemas/topics.py)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from farmesh.dev.kafka import KAFKA_VERSION, PROJECT_DIR
from schemas import topics

ROOT = Path(__file__).resolve().parents[2]
K8S_KAFKA = ROOT / "deploy" / "k8s" / "kafka"
POM = {"m": "http://maven.apache.org/POM/4.0.0"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_one_kafka_version_everywhere() -> None:
    pom = ET.parse(PROJECT_DIR / "pom.xml").getroot()
    assert pom.find("m:properties/m:kafka.version", POM).text == KAFKA_VERSION
    [kafka] = [d for d in pom.findall("m:dependencies/m:dependency", POM) if d.find("m:artifactId", POM).text == "kafka_2.13"]
    assert kafka.find("m:version", POM).text == "${kafka.version}"
    bindings = {d.find("m:artifactId", POM).text for d in pom.findall("m:dependencies/m:dependency", POM)}
    assert {"log4j-slf4j-impl", "log4j-core"} <= bindings  # Kafka logs through slf4j 1.7: its binding, not slf4j2's
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    [cluster] = [d for d in docs(K8S_KAFKA / "kafka.yaml") if d["kind"] == "Kafka"]
    assert str(cluster["spec"]["kafka"]["version"]) == KAFKA_VERSION


def test_k8s_cluster_keeps_acknowledged_writes() -> None:
    [cluster] = [d for d in docs(K8S_KAFKA / "kafka.yaml") if d["kind"] == "Kafka"]
    [pool] = [d for d in docs(K8S_KAFKA / "kafka.yaml") if d["kind"] == "KafkaNodePool"]
    config = cluster["spec"]["kafka"]["config"]
    assert pool["spec"]["replicas"] == 3 and set(pool["spec"]["roles"]) == {"broker", "controller"}
    assert config["default.replication.factor"] == config["offsets.topic.replication.factor"] == 3
    assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == 2
    assert config["unclean.leader.election.enable"] is False
    kustomization = yaml.safe_load((K8S_KAFKA / "kustomization.yaml").read_text())
    assert all((K8S_KAFKA / r).is_file() for r in kustomization["resources"])


def test_k8s_topics_are_the_mesh_topics_with_their_configs() -> None:
    declared = {d["metadata"]["name"]: d["spec"] for d in docs(K8S_KAFKA / "topics.yaml") if d["kind"] == "KafkaTopic"}
    assert set(declared) == {t.name for t in topics.ALL}
    for topic in topics.ALL:
        spec = declared[topic.name]
        assert spec["replicas"] == 3, topic.name
        assert spec.get("config", {}) == dict(topic.config), topic.name


def test_heartbeat_topic_is_created_with_log_append_time() -> None:
    assert dict(topics.HEARTBEATS.config) == {"message.timestamp.type": "LogAppendTime"}
