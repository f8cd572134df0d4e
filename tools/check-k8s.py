"""Reads the rendered Kubernetes overlays as a cluster would run them and fails on the defects
that schema validation cannot see, and validates every operator resource (KEDA, RabbitMQ,
CloudNativePG, Prometheus operator) against the operator's own CRD schema
(deploy/kubernetes/crd-schemas). Run by tools/check-deploy; `--self-test` proves that each
check fails on the defect it is for.

    python3 tools/check-k8s.py SECRET_EXAMPLE RENDERED.yaml...
"""

import json
import os
import re
import sys
import urllib.parse

import jsonschema
import yaml

CRD_SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy", "kubernetes", "crd-schemas")


def strict(schema):
    """As the API server prunes and `kubectl apply --validate=strict` refuses: a field that an
    object schema does not list is an error (unless the schema keeps unknown fields)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def crd_schemas():
    index = json.load(open(os.path.join(CRD_SCHEMAS, "index.json")))
    return {(e["apiVersion"], e["kind"]): strict(json.load(open(os.path.join(CRD_SCHEMAS, e["schema"]))))
            for e in index}


def check_operator_resources(docs, schemas):
    """Every resource of an operator's API must validate against that operator's schema."""
    problems = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        group = doc["apiVersion"].rpartition("/")[0]
        if key not in schemas:
            # Kubernetes' own APIs are validated by kubernetes-validate; any other is an operator's.
            if "." in group and not group.endswith(".k8s.io"):
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: no vendored schema for {key[0]} {key[1]}")
            continue
        for error in jsonschema.Draft7Validator(schemas[key]).iter_errors(doc):
            where = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {where or '(root)'}: {error.message[:200]}")
    return problems

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "Job":
        return spec.get("template", {})
    return spec.get("template", {})


def secret_keys(example):
    return set((example.get("stringData") or {}) | (example.get("data") or {}))


def check(docs, example):
    problems = []
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    keys = secret_keys(example)
    templates = [(d, pod_spec(d)) for d in docs if d["kind"] in WORKLOADS]

    for doc, template in templates:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = template.get("spec", {})
        pod_security = spec.get("securityContext", {})
        secret_mounts = {}
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secret_mounts[volume["name"]] = volume["secret"]
        for container in spec.get("containers", []):
            where = f"{name} container {container['name']}"
            # 1. The Secret's files are root's: the pod's user must be able to read them.
            uid = container.get("securityContext", {}).get("runAsUser", pod_security.get("runAsUser", 0))
            fs_group = pod_security.get("fsGroup")
            mounted = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            for volume, secret in secret_mounts.items():
                if volume not in mounted:
                    continue
                mode = secret.get("defaultMode", 0o644)
                readable = uid == 0 or mode & 0o004 or (fs_group is not None and mode & 0o040)
                if not readable:
                    problems.append(f"{where}: runs as UID {uid} but Secret volume {volume!r} has mode "
                                    f"{mode:04o} and fsGroup {fs_group}: its files cannot be read")
            # 2. Every *_FILE setting names a key the Secret example has.
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for var, path in env.items():
                if var.endswith("_FILE") and path:
                    for mount in mounted.values():
                        if path.startswith(mount.rstrip("/") + "/"):
                            key = path[len(mount.rstrip("/")) + 1:]
                            if key not in keys:
                                problems.append(f"{where}: {var} reads Secret key {key!r}, which the Secret "
                                                f"example does not have")
            # 3. Required settings of the worker.
            if "smsflow-worker" in (container.get("args") or []) + (container.get("command") or []):
                if not ({"SMSFLOW_PLIVO__AUTH_ID", "SMSFLOW_PLIVO__AUTH_ID_FILE"} & set(env)):
                    problems.append(f"{where}: the worker needs plivo.auth_id (SMSFLOW_PLIVO__AUTH_ID[_FILE])")
            # 4. No bare image names.
            image = container.get("image", "")
            last = image.rsplit("/", 1)[-1]
            if ":" not in last and "@" not in image:
                problems.append(f"{where}: image {image!r} has no tag or digest")

    # 5. Every NetworkPolicy selects a pod.
    for policy in by_kind.get("NetworkPolicy", []):
        wanted = policy["spec"].get("podSelector", {}).get("matchLabels", {})
        selects = any(all(t.get("metadata", {}).get("labels", {}).get(k) == v for k, v in wanted.items())
                      for _, t in templates)
        if not selects:
            problems.append(f"NetworkPolicy/{policy['metadata']['name']}: selects no pod ({wanted})")

    # 6. No replicas under an autoscaler; 7. a PDB leaves room to drain a node.
    floors = {}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        floors[hpa["spec"]["scaleTargetRef"]["name"]] = hpa["spec"].get("minReplicas", 1)
    for scaled in by_kind.get("ScaledObject", []):
        floors[scaled["spec"]["scaleTargetRef"]["name"]] = scaled["spec"].get("minReplicaCount", 0)
    for doc, template in templates:
        name = doc["metadata"]["name"]
        if name in floors and "replicas" in doc.get("spec", {}):
            problems.append(f"{doc['kind']}/{name}: spec.replicas is pinned while an autoscaler scales it")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        wanted = pdb["spec"].get("selector", {}).get("matchLabels", {})
        for doc, template in templates:
            labels = template.get("metadata", {}).get("labels", {})
            if doc["kind"] == "Job" or not all(labels.get(k) == v for k, v in wanted.items()):
                continue
            name = doc["metadata"]["name"]
            floor = floors.get(name, doc.get("spec", {}).get("replicas", 1))
            minimum = pdb["spec"].get("minAvailable")
            if isinstance(minimum, int) and minimum >= max(floor, 1):
                problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: minAvailable {minimum} with "
                                f"as few as {floor} replica(s) of {name} blocks every node drain")
            if pdb["spec"].get("maxUnavailable") == 0:
                problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: maxUnavailable 0 blocks drains")

    # 8. KEDA's scaler runs in KEDA's namespace: the broker's host must be fully qualified.
    for auth in by_kind.get("TriggerAuthentication", []):
        for ref in auth["spec"].get("secretTargetRef", []):
            if ref.get("parameter") != "host":
                continue
            url = (example.get("stringData") or {}).get(ref["key"])
            if url is None:
                problems.append(f"TriggerAuthentication/{auth['metadata']['name']}: Secret key {ref['key']!r} "
                                f"is not in the Secret example")
                continue
            host = urllib.parse.urlsplit(url).hostname or ""
            if not re.search(r"\.svc(\.cluster\.local)?$", host):
                problems.append(f"TriggerAuthentication/{auth['metadata']['name']}: host {host!r} does not "
                                f"resolve from KEDA's namespace; use <service>.<namespace>.svc.cluster.local")
    return problems


SELF_TEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: w}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: w}}
    spec:
      securityContext: {runAsUser: 10001}
      containers:
        - name: worker
          image: smsflow
          args: ["smsflow-worker"]
          env: [{name: SMSFLOW_X_FILE, value: /run/secrets/s/missing-key}]
          volumeMounts: [{name: secrets, mountPath: /run/secrets/s}]
      volumes: [{name: secrets, secret: {secretName: s, defaultMode: 0400}}]
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: w}
spec: {scaleTargetRef: {name: w}, minReplicaCount: 1}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: w}
spec: {minAvailable: 1, selector: {matchLabels: {app: w}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {matchLabels: {part-of: nothing}}}
---
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata: {name: t}
spec: {secretTargetRef: [{parameter: host, name: s, key: amqp}]}
"""


def self_test():
    example = {"stringData": {"amqp": "amqp://u:p@rabbit:5672/%2f"}}
    docs = list(yaml.safe_load_all(SELF_TEST))
    docs[1]["spec"]["pollingInterval"] = "often"  # a ScaledObject field of the wrong type
    docs[1]["spec"]["cooldownPeriodd"] = 60  # and one the operator does not know
    problems = "\n".join(check(docs, example) + check_operator_resources(docs, crd_schemas()))
    expected = ["cannot be read", "does not have", "needs plivo.auth_id", "no tag or digest", "selects no pod",
                "pinned while an autoscaler", "blocks every node drain", "does not resolve", "pollingInterval",
                "cooldownPeriodd"]
    missing = [e for e in expected if e not in problems]
    if missing:
        print(f"check-k8s self-test: these defects went unnoticed: {missing}\n{problems}")
        sys.exit(1)
    print(f"check-k8s self-test: all {len(expected)} defect classes are caught")


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    example = yaml.safe_load(open(argv[1]))
    schemas = crd_schemas()
    failed = False
    for path in argv[2:]:
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        problems = check(docs, example) + check_operator_resources(docs, schemas)
        for problem in problems:
            print(f"{path}: {problem}")
        failed |= bool(problems)
        if not problems:
            operator = sum((d["apiVersion"], d["kind"]) in schemas for d in docs)
            print(f"{path}: {len(docs)} resources: secrets readable, settings present, policies select pods, "
                  f"images pinned, autoscalers own replicas, budgets allow drains, KEDA hosts qualified; "
                  f"{operator} operator resources valid against their CRD schemas")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv)
