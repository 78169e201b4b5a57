"""Print every (HTTP method, path) the installed smallestai SDK's generated Waves clients call,
one JSON object per line, read from the SDK's own source (so a new SDK version's routes show).

Paths with parameters come out with `{name}`; WebSocket connects come out as GET.
"""
import ast
import json
import pathlib
import re

import smallestai

root = pathlib.Path(smallestai.__file__).parent / "waves"
seen = set()
for source in root.rglob("raw_client.py"):
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        attr = getattr(node.func, "attr", "")
        if attr in ("request", "stream") and node.args:
            method = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "method"), None)
            path = ast.unparse(node.args[0])
            if method is None:
                continue
        else:
            continue
        seen.add((method, path))
    # WebSocket URLs: `... .waves_ws + "/waves/v1/..."`.
    for match in re.finditer(r'waves_ws \+ "([^"]+)"', source.read_text()):
        seen.add(("GET", repr(match.group(1))))

for method, path in sorted(seen):
    # f"waves/v1/{encode_path_param(model)}/get_voices" -> /waves/v1/{model}/get_voices
    text = path.strip("f").strip("'\"")
    text = re.sub(r"\{encode_path_param\((\w+)\)\}", r"{\1}", text)
    print(json.dumps({"method": method, "path": "/" + text.lstrip("/")}))
