#!/usr/bin/env python3
# Converts Firecracker's swagger YAML to JSON with YAML 1.2 (core schema) scalars:
# PyYAML follows YAML 1.1, where Off/On/Yes/No are booleans (Logger.level's `Off`).
import json, re, sys, yaml

class Loader(yaml.SafeLoader):
    pass

Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

doc = yaml.load(sys.stdin, Loader=Loader)
json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
sys.stdout.write("\n")
