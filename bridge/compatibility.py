"""Whether data written with one Avro schema can be read with another, and if not, why.

The rules are the Avro specification's "Schema Resolution", checked on whole schemas as schema
registries do, so a change is judged before any message exists. Each problem names the field
path and what a person would change. Pure: schemas are self-contained JSON definitions.

Levels follow Confluent's names: BACKWARD (the new schema reads data of the old), FORWARD (the
old reads the new), FULL (both), NONE; `_TRANSITIVE` compares against every older version
instead of the latest only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
LOGICAL_KEYS = ("logicalType", "precision", "scale")
# Promotions whose two types encode a value in the same bytes (a zigzag varint; a length and
# the bytes): the writer's data reads as the reader's type, logical type and all.
_SAME_BYTES = {("int", "long"), ("string", "bytes"), ("bytes", "string")}

# Writer type -> reader types it promotes to (besides itself).
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


def read_problems(reader: Any, writer: Any) -> list[str]:
    """Why data written with `writer` cannot be read with `reader`; empty when it can."""
    resolution = _Resolution()
    resolution.readers.learn(reader, None)
    resolution.writers.learn(writer, None)
    resolution.check(reader, writer, "")
    return resolution.problems


def with_readers_logical_types(reader: Any, writer: Any) -> Any:
    """`writer` carrying `reader`'s logical types where the two meet, and no others.

    Avro resolution converts with the reader's logical types, as Java does; fastavro converts
    with the writer's. Reading with this instead of `writer` gives a handler the datetimes and
    Decimals it declares from a producer that registered its version without them, and plain
    ints from one whose version has them where the handler's has none. Assumes `reader` can
    read `writer`'s data (`read_problems` is empty).
    """
    resolution = _Resolution()
    resolution.readers.learn(reader, None)
    resolution.writers.learn(writer, None)
    return resolution.annotate(reader, writer, None, None)


def _logical(reader: dict[str, Any], writer: dict[str, Any]) -> dict[str, Any]:
    """The logical type to read a value with: the reader's, or none; but the writer's where
    both have one and they differ (a decimal's scale, a timestamp's unit), as the bytes mean
    what the writer's says."""
    ours, theirs = ({k: node[k] for k in LOGICAL_KEYS if k in node} for node in (reader, writer))
    ours, theirs = (keys if "logicalType" in keys else {} for keys in (ours, theirs))
    return theirs if ours and theirs and ours != theirs else ours


def strip_logical_types(schema: Any) -> Any:
    """The same schema without logicalType annotations, so timestamps stay integers."""
    if isinstance(schema, list):
        return [strip_logical_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if "fields" in schema:
        out["fields"] = [{**f, "type": strip_logical_types(f["type"])} for f in schema["fields"]]
    return out


def level_problems(level: str, new: Any, older: Sequence[Any]) -> list[str]:
    """Why `new` breaks `level` against `older` versions (oldest first); empty when it does not."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}; use one of {', '.join(LEVELS)}")
    if level == "NONE" or not older:
        return []
    against = older if level.endswith("_TRANSITIVE") else older[-1:]
    problems = []
    for index, old in enumerate(against):
        version = f"version {len(older) - len(against) + index + 1}"
        if level.startswith(("BACKWARD", "FULL")):
            problems += [f"cannot read {version}'s data: {p}" for p in read_problems(new, old)]
        if level.startswith(("FORWARD", "FULL")):
            problems += [f"{version} cannot read its data: {p}" for p in read_problems(old, new)]
    return problems


class Names:
    """The named types of one side, by full name, wherever each is defined: a field the
    other side lacks is never compared, yet may define a type that a later field names."""

    def __init__(self) -> None:
        self.defined: dict[str, Any] = {}

    def learn(self, node: Any, namespace: str | None) -> None:
        """Every named type defined in `node`, at any depth."""
        if isinstance(node, list):
            for branch in node:
                self.learn(branch, namespace)
            return
        if not isinstance(node, dict):
            return
        if node.get("type") in ("record", "error", "enum", "fixed"):
            full = full_name(node["name"], node.get("namespace", namespace))
            self.defined.setdefault(full, node)
            namespace = full.rpartition(".")[0] or None
        elif isinstance(node.get("type"), (dict, list)):
            self.learn(node["type"], namespace)
        for field in node.get("fields", ()):
            self.learn(field["type"], namespace)
        for key in ("items", "values"):
            if key in node:
                self.learn(node[key], namespace)

    def resolve(self, node: Any, namespace: str | None) -> tuple[Any, str | None]:
        if isinstance(node, str) and node not in PRIMITIVES:
            full = full_name(node, namespace)
            if full in self.defined:
                return self.defined[full], full.rpartition(".")[0] or None
        if isinstance(node, dict) and node.get("type") in ("record", "error", "enum", "fixed"):
            full = full_name(node["name"], node.get("namespace", namespace))
            self.defined.setdefault(full, node)
            return node, full.rpartition(".")[0] or None
        return node, namespace


def kind_of(node: Any) -> str:
    if isinstance(node, list):
        return "union"
    if isinstance(node, str):
        return node
    kind = node["type"]
    return kind_of(kind) if not isinstance(kind, str) or kind in PRIMITIVES else kind


def unwrap(node: Any) -> Any:
    """`{"type": "int"}` and friends as the primitive they annotate."""
    while isinstance(node, dict) and (not isinstance(node["type"], str) or node["type"] in PRIMITIVES):
        node = node["type"]
    return node


def full_name(name: str, namespace: str | None) -> str:
    """A named type's full name: `name` itself when dotted, else within `namespace`."""
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _describe(node: Any, namespace: str | None = None) -> str:
    node = unwrap(node)
    if isinstance(node, list):
        return " or ".join(_describe(branch, namespace) for branch in node)
    if isinstance(node, str):
        return node if node in PRIMITIVES else full_name(node, namespace)
    if "name" in node:
        return f"{node['type']} {full_name(node['name'], node.get('namespace', namespace))}"
    return str(node["type"])


class _Resolution:
    """One comparison of a reader with a writer schema, gathering every problem on the way."""

    def __init__(self) -> None:
        self.readers, self.writers = Names(), Names()
        self.pairs: set[tuple[str, str]] = set()  # named types already being compared
        self.problems: list[str] = []

    def trial(
        self, reader: Any, writer: Any, path: str, reader_ns: str | None, writer_ns: str | None
    ) -> bool:
        """Whether `writer` resolves to `reader`, leaving no problem behind either way."""
        problems, pairs = self.problems, set(self.pairs)
        self.problems = []
        self.check(reader, writer, path, reader_ns, writer_ns)
        fits = not self.problems
        self.problems, self.pairs = problems, pairs
        return fits

    def check(
        self, reader: Any, writer: Any, path: str, reader_ns: str | None = None, writer_ns: str | None = None
    ) -> None:
        reader, reader_ns = self.readers.resolve(unwrap(reader), reader_ns)
        writer, writer_ns = self.writers.resolve(unwrap(writer), writer_ns)
        where = path or "the record"
        r_kind, w_kind = kind_of(reader), kind_of(writer)

        if w_kind == "union":  # every branch the writer may have used must be readable
            for branch in writer:
                before = len(self.problems)
                self.check(reader, branch, path, reader_ns, writer_ns)
                if len(self.problems) > before and r_kind != "union":
                    return
            return
        if r_kind == "union":
            if not any(self.trial(branch, writer, path, reader_ns, writer_ns) for branch in reader):
                self.problems.append(
                    f"{where}: a {_describe(writer, writer_ns)} is written, "
                    f"and the reader's union ({_describe(reader, reader_ns)}) has no branch for it"
                )
            return
        if r_kind != w_kind:
            if r_kind not in _PROMOTIONS.get(w_kind, ()):
                was, now = _describe(writer, writer_ns), _describe(reader, reader_ns)
                self.problems.append(f"{where}: type changed from {was} to {now}")
            return
        if r_kind in ("record", "error", "enum", "fixed"):
            r_name = full_name(reader["name"], reader.get("namespace", reader_ns))
            w_name = full_name(writer["name"], writer.get("namespace", writer_ns))
            aliases = {full_name(a, r_name.rpartition(".")[0] or None) for a in reader.get("aliases", ())}
            # (Avro matches named types by unqualified name, so a nested type's namespace may
            # change. A job's record itself keeps its full name, its job type: codec.decode
            # refuses another.)
            unqualified = r_name.rpartition(".")[2] == w_name.rpartition(".")[2]
            if r_name != w_name and not unqualified and w_name not in aliases:
                self.problems.append(
                    f"{where}: {r_kind} {w_name} is now named {r_name}; add the old name to aliases"
                )
                return
            if (r_name, w_name) in self.pairs:
                return
            self.pairs.add((r_name, w_name))
            reader_ns, writer_ns = r_name.rpartition(".")[0] or None, w_name.rpartition(".")[0] or None
        if r_kind in ("record", "error"):
            self.fields(reader, writer, path, reader_ns, writer_ns)
        elif r_kind == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                self.problems.append(
                    f"{where}: enum symbols {', '.join(missing)} were removed and the enum has no default"
                )
        elif r_kind == "fixed" and reader["size"] != writer["size"]:
            self.problems.append(f"{where}: fixed size changed from {writer['size']} to {reader['size']}")
        elif r_kind == "array":
            self.check(reader["items"], writer["items"], f"{path}[]", reader_ns, writer_ns)
        elif r_kind == "map":
            self.check(reader["values"], writer["values"], f"{path}{{}}", reader_ns, writer_ns)

    def annotate(self, reader: Any, writer: Any, reader_ns: str | None, writer_ns: str | None) -> Any:
        """`writer` with `reader`'s logical types (see `with_readers_logical_types`)."""
        if isinstance(writer, str) and writer not in PRIMITIVES:
            return writer  # a named type defined before: annotated where it is defined
        r_node, reader_ns = self.readers.resolve(unwrap(reader), reader_ns)
        w_node = unwrap(writer)
        w_kind = kind_of(w_node)
        if w_kind == "union":
            return [self.annotate(reader, branch, reader_ns, writer_ns) for branch in w_node]
        if kind_of(r_node) == "union":  # the branch the writer's data resolves to
            fits = (b for b in r_node if self.trial(b, w_node, "", reader_ns, writer_ns))
            reader = next(fits, "null")
            r_node, reader_ns = self.readers.resolve(unwrap(reader), reader_ns)
        if w_kind in PRIMITIVES:  # its logical type is on the node that wraps it
            r_kind = kind_of(r_node)
            if (w_kind, r_kind) in _SAME_BYTES and isinstance(reader, dict) and "logicalType" in reader:
                w_kind = r_kind  # (read as the reader's type, so its logical type applies)
            same = isinstance(reader, dict) and r_kind == w_kind
            wanted = _logical(reader if same else {}, writer if isinstance(writer, dict) else {})
            return {"type": w_kind, **wanted} if wanted else w_kind
        node = {k: v for k, v in w_node.items() if k not in LOGICAL_KEYS}
        if w_kind == "fixed" and kind_of(r_node) == "fixed" and r_node["size"] == w_node["size"]:
            node.update(_logical(r_node, w_node))
        if w_kind in ("record", "error", "enum", "fixed"):
            w_name = full_name(w_node["name"], w_node.get("namespace", writer_ns))
            writer_ns = w_name.rpartition(".")[0] or None
        if w_kind in ("record", "error") and kind_of(r_node) in ("record", "error"):
            r_name = full_name(r_node["name"], r_node.get("namespace", reader_ns))
            reader_ns = r_name.rpartition(".")[0] or None
            fields: dict[str, Any] = {}
            for field in r_node["fields"]:
                for name in (field["name"], *field.get("aliases", ())):
                    fields.setdefault(name, field["type"])
            node["fields"] = [
                {**f, "type": self.annotate(fields[f["name"]], f["type"], reader_ns, writer_ns)}
                if f["name"] in fields
                else {**f, "type": strip_logical_types(f["type"])}  # (skipped, but may define a type)
                for f in w_node["fields"]
            ]
        elif w_kind == "array" and kind_of(r_node) == "array":
            node["items"] = self.annotate(r_node["items"], w_node["items"], reader_ns, writer_ns)
        elif w_kind == "map" and kind_of(r_node) == "map":
            node["values"] = self.annotate(r_node["values"], w_node["values"], reader_ns, writer_ns)
        return node

    def fields(
        self, reader: Any, writer: Any, path: str, reader_ns: str | None, writer_ns: str | None
    ) -> None:
        written = {f["name"]: f for f in writer["fields"]}
        for field in reader["fields"]:
            here = f"{path}.{field['name']}" if path else field["name"]
            names = (field["name"], *field.get("aliases", ()))
            match = next((written[n] for n in names if n in written), None)
            if match is not None:
                self.check(field["type"], match["type"], here, reader_ns, writer_ns)
            elif "default" not in field:
                self.problems.append(
                    f"{here}: the written data lacks this field and it has no default; give it one"
                )
