"""The model card (``README.md``) of a learned-optimizer artifact.

Rendered with ``huggingface_hub.ModelCard.from_template`` from ``lopt_hf/templates/model_card.md``
(a Jinja template; jinja2 comes with torch). Tables are built here as Markdown strings so the
template stays readable.

Provenance keys the card knows about (all optional):

* ``name`` — card title; ``description`` — a paragraph under the title;
* ``license`` (default ``apache-2.0``), ``tags`` (extra Hub tags), ``citation`` (BibTeX);
* ``base_model`` — the Hub model id these weights come from (card metadata ``base_model``);
* ``paper`` (a URL; an arXiv one also becomes an ``arxiv:ID`` tag, which the Hub links), ``paper_title``
  (default: the title in ``citation``), ``original_authors``, ``original_code``, ``original_license``,
  ``original_weights`` (a Hub repo id or URL) — the work the optimizer comes from, shown in a "Paper
  and licence" section (converted checkpoints);
* ``untrained`` — true for a random initialisation (``lopt-hf create``): the card says, at the top, that
  it is not a usable optimizer;
* ``meta_training`` — a dict, shown flattened as the "Meta-training config" table; or, as
  ``lopt_hf.publish.export`` writes it, a dict with ``summary`` (display label → value, shown
  in order like the Celo2 card's table: optimizer architecture, tasks, meta-trainer, truncation,
  unroll range, outer iterations, meta-optimizer, processes, wall time, ...), ``plot`` (meta-loss
  curve image, a path relative to the repo) and ``config`` (the full YAML config, shown folded);
  any other keys are added to the table flattened;
* ``evaluation`` — a list of row dicts (one table), a dict of metric → value, or a dict with
  ``results`` (either of those), an optional ``description`` and an optional ``plot`` (an image
  path relative to the repo, shown under the table); or a dict with ``sections``: a list of such
  dicts, each with a ``title`` and optionally ``table`` (ready Markdown, e.g. from
  ``lopt_hf.evaluation.markdown_table``) — one sub-section each (e.g. 1× and 10× the
  meta-training horizon);
* ``limitations`` — text for a "Limitations" section;
* ``reproduce`` — shell commands that rebuild the artifact, shown in a "Reproduce" section;
* ``shipped_as`` — the short name of an optimizer shipped inside lopt_hf (``lopt-hf/...``): the
  usage snippets load it by that name, offline.

Every other provenance key is listed in the "Provenance" table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .rules.base import RuleConfigError, rule_class

TEMPLATE_PACKAGE = "lopt_hf"
TEMPLATE_NAME = "templates/model_card.md"
DEFAULT_LICENSE = "apache-2.0"
BASE_TAGS = ("learned-optimizer", "lopt_hf")
# Provenance keys rendered in their own sections rather than in the provenance table.
CARD_KEYS = ("name", "description", "license", "tags", "citation", "meta_training", "evaluation", "limitations",
             "reproduce", "shipped_as", "base_model", "paper", "paper_title", "original_authors", "original_code",
             "original_license", "original_weights", "untrained")
ARXIV_URL = re.compile(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})")
BIBTEX_TITLE = re.compile(r"title\s*=\s*[{\"](.+?)[}\"]\s*,", re.IGNORECASE | re.DOTALL)
# config.json is written with its keys sorted (transformers' to_json_string), so a card rendered from a saved
# artifact (lopt-hf push, lopt-hf card) sees every mapping alphabetically. The meta-training table and the
# config's sections are shown in the order lopt_hf.publish.export builds them (MetaTrainConfig's fields); keys
# not listed follow, and the keys inside a config section are sorted, so a card renders the same from memory
# (export) and from disk (push).
SUMMARY_ORDER = ("Update rule", "Optimizer architecture", "Meta-training tasks", "Task architecture", "Meta-trainer",
                 "Task slots per outer step", "Outer iterations", "Truncation length", "Min unroll length",
                 "Max unroll length", "Perturbation std", "Meta-optimizer", "Processes", "Wall time",
                 "Meta-loss (first → last)", "Seed")
CONFIG_ORDER = ("name", "seed", "outer_steps", "rule", "task", "extra_tasks", "estimator", "meta_optimizer",
                "checkpoint_every", "keep_checkpoints", "log_every", "log_with", "num_threads", "output_dir", "push_to_hub", "card",
                "evaluation", "lolo")
UNTRAINED_NOTE = ("**Untrained: a random initialisation, not a usable optimizer.** Its meta-parameters are random "
                  "(written by `lopt-hf create`), so its updates are arbitrary; it is a starting point for "
                  "meta-training (`lopt-hf metatrain` with `rule.init_from` set to this folder) and a fixture for "
                  "tests. For an optimizer that trains models, see `lopt-hf pretrained` or a meta-trained artifact.")


def template_text() -> str:
    """The packaged model-card template."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def render_model_card(*, rule: str, rule_config: Mapping[str, Any], theta_shapes: Mapping[str, tuple[int, ...]],
                      optimizer_defaults: Mapping[str, Any], harness: Mapping[str, Any] | None,
                      provenance: Mapping[str, Any], format_version: int, repo_id: str | None = None) -> ModelCard:
    """Render the card of an artifact.

    Args:
        rule, rule_config, optimizer_defaults, harness, provenance, format_version: the config fields.
        theta_shapes: name → shape of the meta-parameters.
        repo_id: the Hub repo the card is for (used in the usage snippets); ``None`` for a local folder.
    """
    provenance = dict(provenance)
    tags = [*BASE_TAGS, rule]
    extra_tags = provenance.get("tags")
    if isinstance(extra_tags, list):
        tags += [str(tag) for tag in extra_tags if str(tag) not in tags]
    arxiv = ARXIV_URL.search(str(provenance.get("paper") or ""))
    if arxiv and f"arxiv:{arxiv.group(1)}" not in tags:
        tags.append(f"arxiv:{arxiv.group(1)}")
    base_model = provenance.get("base_model")
    card_data = ModelCardData(library_name="lopt_hf", license=str(provenance.get("license", DEFAULT_LICENSE)),
                              tags=tags, base_model=str(base_model) if base_model else None)
    num_meta_parameters = sum(math.prod(shape) for shape in theta_shapes.values())
    name = provenance.get("name") or (repo_id.split("/")[-1] if repo_id else f"{rule} learned optimizer")

    meta_training = provenance.get("meta_training")
    evaluation = provenance.get("evaluation")
    other = {key: value for key, value in provenance.items() if key not in CARD_KEYS}
    citation = provenance.get("citation")
    return ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=str(name),
        description="\n\n".join(
            part for part in (UNTRAINED_NOTE if provenance.get("untrained") else "",
                              str(provenance.get("description") or "").strip()) if part),
        rule=rule,
        repo_id=repo_id,
        load_path=repo_id or provenance.get("shipped_as") or "path/to/this/folder",
        shipped_as=provenance.get("shipped_as") or "",
        num_meta_parameters=f"{num_meta_parameters:,}",
        hyperparameter_table=key_value_table(rule_config, ("Hyper-parameter", "Value"), code_keys=True),
        theta_table=markdown_table(("Tensor", "Shape"), [(f"`{name}`", _shape(shape))
                                                         for name, shape in theta_shapes.items()]),
        optimizer_defaults_table=key_value_table(optimizer_defaults, ("Setting", "Value"), code_keys=True),
        harness_table=key_value_table(_flatten(harness), ("Setting", "Value")) if harness else "",
        meta_training_section=(meta_training_section(meta_training)
                               if isinstance(meta_training, Mapping) and meta_training else ""),
        evaluation_section=evaluation_section(evaluation) if evaluation else "",
        provenance_table=(key_value_table(dict(sorted(_flatten(other).items())), ("Key", "Value")) if other
                          else "(none recorded)"),  # sorted, as config.json stores them
        format_version=format_version,
        extra_files=extra_files_table_rows(meta_training, evaluation),
        citation=str(citation).strip() if citation else "",
        paper_section=paper_section(provenance),
        untrained=bool(provenance.get("untrained")),
        scheduled=_is_scheduled(rule),
        limitations=str(provenance.get("limitations") or "").strip(),
        reproduce=str(provenance.get("reproduce") or "").strip(),
    )


def _is_scheduled(rule: str) -> bool:
    """Whether ``rule`` is a scheduled rule (it needs the planned steps and the loss every step)."""
    try:
        return bool(rule_class(rule).scheduled)
    except RuleConfigError:
        return False


def paper_section(provenance: Mapping[str, Any]) -> str:
    """Markdown list of the work an optimizer comes from (paper, authors, code, licences), or ``""``."""
    paper, code = provenance.get("paper"), provenance.get("original_code")
    if not (paper or code or provenance.get("original_authors")):
        return ""
    title = provenance.get("paper_title")
    if not title:
        found = BIBTEX_TITLE.search(str(provenance.get("citation") or ""))
        title = " ".join(found.group(1).replace("{", "").replace("}", "").split()) if found else None
    lines = []
    if paper:
        arxiv = ARXIV_URL.search(str(paper))
        label = f"arXiv {arxiv.group(1)}" if arxiv else str(paper)
        lines.append(f"- **Paper**: {f'“{title}”, ' if title else ''}[{label}]({paper})")
    if provenance.get("original_authors"):
        lines.append(f"- **Authors**: {provenance['original_authors']}")
    if code:
        licence = f" ({provenance['original_license']} licence)" if provenance.get("original_license") else ""
        lines.append(f"- **Original code**: [{code}]({code}){licence}")
    weights = provenance.get("original_weights")
    if weights:
        url = str(weights) if "://" in str(weights) else f"https://huggingface.co/{weights}"
        lines.append(f"- **Published weights**: [{weights}]({url})")
    lines.append(f"- **License of this artifact**: `{provenance.get('license', DEFAULT_LICENSE)}` (card metadata)"
                 + (f"; base model [`{provenance['base_model']}`](https://huggingface.co/{provenance['base_model']})"
                    if provenance.get("base_model") else ""))
    return "\n".join(lines)


def meta_training_section(meta_training: Mapping[str, Any]) -> str:
    """Markdown for ``provenance["meta_training"]`` (see the module docstring for accepted shapes)."""
    summary = meta_training.get("summary")
    if not isinstance(summary, Mapping):
        return key_value_table(_flatten(meta_training), ("Key", "Value"))
    rows = [(f"**{_cell(label)}**", _cell(value)) for label, value in _in_order(summary, SUMMARY_ORDER).items()]
    rest = {key: value for key, value in meta_training.items() if key not in ("summary", "plot", "config")}
    rows += [(_cell(key), _cell(value)) for key, value in _flatten(rest).items()] if rest else []
    parts = [markdown_table(("Key", "Value"), rows)]
    plot = meta_training.get("plot")
    if isinstance(plot, str) and plot:
        parts.append(f"![meta-loss during meta-training]({plot})")
    config = meta_training.get("config")
    if isinstance(config, Mapping) and config:
        text = _yaml_block(_in_order(_sorted_within(config), CONFIG_ORDER))
        parts.append("<details>\n<summary>Full meta-training config (YAML; save it as config.yaml and reproduce "
                     "with <code>lopt-hf metatrain --config config.yaml</code>)</summary>\n\n"
                     f"```yaml\n{text}\n```\n\n</details>")
    return "\n\n".join(parts)


def _in_order(values: Mapping[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """``values`` with the keys in ``order`` first, in that order, then the others as they come."""
    return {**{key: values[key] for key in order if key in values},
            **{key: value for key, value in values.items() if key not in order}}


def _sorted_within(values: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys as they come; the keys of nested mappings sorted (as config.json stores them), in lists too
    (``extra_tasks``), so a card renders the same at export and from a saved config.json."""
    def sort(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: sort(value[key]) for key in sorted(value)}
        return [sort(item) for item in value] if isinstance(value, list) else value

    return {key: sort(value) for key, value in values.items()}


def _yaml_block(values: Mapping[str, Any]) -> str:
    """YAML with mappings as blocks and lists of scalars inline (``hidden_sizes: [32]``), like a config file."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
        flow = all(not isinstance(item, (dict, list)) for item in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    def represent_str(dumper: yaml.SafeDumper, data: str) -> Any:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)

    _Dumper.add_representer(list, represent_list)
    _Dumper.add_representer(str, represent_str)
    return yaml.dump(_plain(values), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True).strip()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def card_images(provenance: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, description)`` of every image the card shows; they travel with the artifact."""
    images = []
    meta_training = provenance.get("meta_training")
    evaluation = provenance.get("evaluation")
    sections = [(meta_training, "meta-loss curve of meta-training"), (evaluation, "evaluation plot")]
    if isinstance(evaluation, Mapping) and isinstance(evaluation.get("sections"), list):
        sections += [(section, f"evaluation plot: {section.get('title', '')}".rstrip(": "))
                     for section in evaluation["sections"] if isinstance(section, Mapping)]
    for section, description in sections:
        plot = section.get("plot") if isinstance(section, Mapping) else None
        if isinstance(plot, str) and plot:
            images.append((plot, description))
    return images


def extra_files_table_rows(meta_training: Any, evaluation: Any) -> str:
    """Rows of the "Files" table for the images the card shows (they travel with the artifact)."""
    images = card_images({"meta_training": meta_training, "evaluation": evaluation})
    return "\n".join(f"| `{_cell(plot)}` | {description} |" for plot, description in images)


def evaluation_section(evaluation: Any, *, heading: str = "###") -> str:
    """Markdown for ``provenance["evaluation"]`` (see the module docstring for accepted shapes)."""
    description, plot, results = "", None, evaluation
    if isinstance(evaluation, Mapping) and ("results" in evaluation or "plot" in evaluation
                                            or "description" in evaluation or "sections" in evaluation
                                            or "table" in evaluation):
        description = str(evaluation.get("description") or "")
        plot = evaluation.get("plot")
        results = evaluation.get("results")
    parts = [description] if description else []
    if isinstance(evaluation, Mapping) and isinstance(evaluation.get("table"), str):
        parts.append(evaluation["table"].strip())
    if isinstance(evaluation, Mapping) and isinstance(evaluation.get("sections"), list):
        for section in evaluation["sections"]:
            if isinstance(section, Mapping):
                title = str(section.get("title") or "").strip()
                body = evaluation_section({key: value for key, value in section.items() if key != "title"},
                                          heading=heading + "#")
                parts.append(f"{heading} {title}\n\n{body}" if title else body)
    if isinstance(results, list) and results and all(isinstance(row, Mapping) for row in results):
        columns: list[str] = []
        for row in results:
            columns += [str(key) for key in row if str(key) not in columns]
        parts.append(markdown_table(columns, [[_cell(row.get(column, "")) for column in columns] for row in results]))
    elif isinstance(results, Mapping) and results:
        parts.append(key_value_table(_flatten(results), ("Metric", "Value")))
    elif results:
        parts.append(_cell(results))
    if plot:
        parts.append(f"![evaluation]({plot})")
    return "\n\n".join(parts)


def key_value_table(values: Mapping[str, Any], header: tuple[str, str], *, code_keys: bool = False) -> str:
    """A two-column Markdown table of ``values``."""
    if not values:
        return "(none)"
    rows = [(f"`{_cell(key)}`" if code_keys else _cell(key), _cell(value)) for key, value in values.items()]
    return markdown_table(header, rows)


def markdown_table(header: Any, rows: Any) -> str:
    """A Markdown table; cells are escaped for pipes and newlines."""
    header = [str(cell) for cell in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys: ``{"inner": {"lr": 1}}`` → ``{"inner.lr": 1}``."""
    if not isinstance(values, Mapping):
        return {prefix or "value": values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, (list, tuple, dict)) or value is None or isinstance(value, bool):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"
