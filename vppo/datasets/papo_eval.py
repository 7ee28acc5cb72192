"""The authors' evaluation layout: PAPO-Eval's `data/` folder as chamber111/VPPO-Eval ships it.

The released VPPO README: "place the `data` folder from [chamber111/VPPO-Eval] directly into your
local PAPO-Eval repository ... benchmark names can be found in the `data/dataset_info.json` file".
Schema (xhguo7/PAPO-Eval `data/dataset_info.json`, LLaMA-Factory's dataset registry): each entry
maps a name to {"file_name" (relative to `data/`), "formatting": "sharegpt", "columns":
{"messages", "images"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
"assistant_tag": "assistant"}}. The benchmark entries are `hiyouga_geometry3k`, `AI4Math_MathVerse`,
`AI4Math_MathVerse_vision_dependent`, `We-Math_We-Math`, `lscpku_LogicVista`, `MMMU_MMMU_Pro`,
`PAPO_MMK12` (files under `data/papo/`), `DynaMath_DynaMath_Sample` and `MathLLMs_MathVision` (under
`data/vppo/`, VPPO's filtered subsets). Each file is a JSON list of records {"messages": [{"role":
"user", "content": "<image>question with its options"}, {"role": "assistant", "content": label}],
"images": ["./data/images/<entry>/<file>"]}; PAPO-Eval's prepare_data.py unpacks the image zips
into `data/images/`.

Image paths are resolved as LLaMA-Factory resolves them when PAPO-Eval's scripts run from the
checkout root: relative to the media folder (default: the dataset folder, `data/`) when the file
is there, else relative to the working directory, the checkout root (the parent of `data/`); the
folder of the JSON file is tried last (older layouts of this project). The question is the first
user turn (the released prompt suffix at its end, if the file carries it, is dropped whatever its
spacing: the evaluation appends the suffix itself), the label the last assistant turn (a label
written `\\boxed{x}` is unwrapped to `x`;
PAPO-Eval's grader compares the boxed content of a response with the label as stored). The
`alpaca` formatting (prompt / query / response columns) is read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vppo.data import IMAGE_PLACEHOLDER, PROMPT_SUFFIX
from vppo.datasets import RawRows, broken_row, image_value

SCHEMA = "xhguo7/PAPO-Eval data/dataset_info.json (LLaMA-Factory sharegpt entries) + ShareGPT JSON"
# (role, content, user, assistant) message keys: LLaMA-Factory's default and the OpenAI style.
MESSAGE_TAGS = (("from", "value", "human", "gpt"), ("role", "content", "user", "assistant"))


def info_path(data_dir: Path) -> Path | None:
    """DIR/dataset_info.json (DIR is PAPO-Eval's `data/`) or DIR/data/dataset_info.json (DIR is the
    checkout root); None when neither exists."""
    for p in (data_dir / "dataset_info.json", data_dir / "data" / "dataset_info.json"):
        if p.is_file():
            return p
    return None


def read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object of dataset entries")
    return info


def read_records(path: Path) -> list[dict]:
    """Records of a JSON list file, a JSON lines file (.jsonl, or any file that is not one JSON
    value), or a {"<key>": [...]} wrapper."""
    text = path.read_text(encoding="utf-8")
    try:
        data = None if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {e}") from e
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of records")
    return data


def unbox(label: str) -> str:
    """A label written as `\\boxed{x}` -> `x` (the grader compares the boxed content of a response
    with the bare answer). Anything else is returned stripped."""
    s = label.strip()
    m = re.fullmatch(r"\\boxed\s*\{(.*)\}", s, flags=re.S)
    if m is None:
        return s
    inner, depth = m.group(1), 0
    for ch in inner:  # only unwrap when the braces of the box close at the very end
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return s
    return inner.strip() if depth == 0 else s


# The released suffix at the end of a text, whatever whitespace separates its words (a file that
# wraps or double-spaces it must not leave the instruction in the prompt twice).
_SUFFIX_RE = re.compile(r"\s*" + r"\s+".join(re.escape(w) for w in PROMPT_SUFFIX.split()) + r"\s*$")


def strip_suffix(text: str) -> str:
    """Drop the VPPO prompt suffix (the PAPO / EasyR1 format prompt) already at the end of the
    question, compared word by word: the evaluation appends it once."""
    m = _SUFFIX_RE.search(text)
    return text[: m.start()] if m else text


def message_tags(records: list[dict], cols: dict, tags: dict, where: str) -> tuple[str, str, str, str]:
    """The (role, content, user, assistant) keys of the ShareGPT messages: the entry's `tags` over
    the MESSAGE_TAGS layout whose role and content keys the messages use. ValueError naming the
    keys found when neither layout fits."""
    col = cols.get("messages", "conversations")
    found = {k for r in records for m in (r.get(col) or []) if isinstance(m, dict) for k in m}
    names = ("role_tag", "content_tag", "user_tag", "assistant_tag")
    if found and "role_tag" not in tags:
        fits = [t for t in MESSAGE_TAGS if {t[0], t[1]} <= found]
        if not fits:
            raise ValueError(
                f"{where}: the {col!r} messages have keys {sorted(found)}, neither from/value nor "
                "role/content; set 'tags' (role_tag, content_tag, user_tag, assistant_tag) in the entry"
            )
        return tuple(tags.get(n, d) for n, d in zip(names, fits[0]))
    return tuple(tags.get(n, d) for n, d in zip(names, MESSAGE_TAGS[0]))


def read(info_file: Path, name: str) -> tuple[RawRows, str]:
    """Entry `name` of `info_file` as training-schema rows, and its formatting."""
    info = read_info(info_file)
    entry = info[name]
    where = f"{info_file}[{name!r}]"
    if "file_name" not in entry:
        raise ValueError(f"{where}: the entry has no 'file_name' (hub entries are not read offline)")
    media = info_file.parent  # LLaMA-Factory's media_dir defaults to the dataset folder
    path = media / entry["file_name"]
    if not path.is_file():
        raise ValueError(f"{where} names {path}, which does not exist")
    raw = records_to_rows(read_records(path), entry, where, [media, media.parent, path.parent])
    raw.files = [info_file, path]
    raw.choice = {"entry": name, "dataset_info": str(info_file), **raw.choice}
    return raw, raw.choice["formatting"]


def records_to_rows(records: list[dict], entry: dict, where: str, base: list[Path] | None) -> RawRows:
    """ShareGPT / alpaca records of a dataset_info `entry` -> training-schema rows. Image paths are
    resolved under the `base` folders in order (a path found nowhere makes its row broken, with the
    places looked); `base=None` keeps them as written."""
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("sharegpt", "alpaca"):
        raise ValueError(f"{where}: formatting must be 'sharegpt' or 'alpaca', got {formatting!r}")
    cols, tags = entry.get("columns", {}), entry.get("tags", {})
    image_col = cols.get("images", "images")
    if formatting == "sharegpt":
        role, content, user, assistant = message_tags(records, cols, tags, where)
    rows, broken, n_stripped = [], {}, 0
    for i, rec in enumerate(records):
        if formatting == "sharegpt":
            msgs = rec.get(cols.get("messages", "conversations")) or []
            users = [m.get(content, "") for m in msgs if isinstance(m, dict) and m.get(role) == user]
            bots = [m.get(content, "") for m in msgs if isinstance(m, dict) and m.get(role) == assistant]
            question, label = (users[0] if users else ""), (bots[-1] if bots else "")
        else:
            prompt, query = (
                rec.get(cols.get("prompt", "instruction")) or "",
                rec.get(cols.get("query", "input")),
            )
            question = f"{prompt}\n{query}" if query else prompt
            label = rec.get(cols.get("response", "output")) or ""
        images = rec.get(image_col) or []
        images = [images] if isinstance(images, str) else list(images)
        try:
            images = [image_value(im, base) for im in images] if base is not None else images
        except (ValueError, FileNotFoundError) as e:
            rows.append(broken_row(i, str(e), broken))
            continue
        stripped = strip_suffix(str(question))
        n_stripped += stripped != str(question)
        question = stripped
        if images and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER * len(images) + question
        label = unbox(label) if isinstance(label, str) else label  # vppo.data counts the others
        rows.append({"problem": question, "answer": label, "images": images, "row": i})
    choice = {"formatting": formatting, "schema": SCHEMA}
    if n_stripped:  # the files carried the instruction; the evaluation appends its own suffix once
        choice["suffix_in_file"] = n_stripped
    return RawRows(rows, [], choice, broken)
