"""Label config parsing without label-studio-sdk.

`parse_config` returns the same shape as Label Studio's own parser
(``{from_name: {type, to_name, inputs: [{type, value}], labels, labels_attrs}}``),
so code written against the reference SDK's ``parsed_label_config`` keeps working.
`parse_tags` keeps every tag's attributes, for the prediction validator.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# Tags whose `value` names a label of the control tag they sit in.
_LABEL_TAGS = {"Label", "Choice", "Relation"}


class LabelConfigError(ValueError):
    """The label config is not XML that Label Studio would accept."""


@dataclass
class ControlTag:
    name: str
    type: str
    to_name: list[str]
    attrs: dict[str, str]
    labels: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class ObjectTag:
    name: str
    type: str
    value: str
    attrs: dict[str, str]


@dataclass
class LabelConfigTags:
    controls: dict[str, ControlTag]
    objects: dict[str, ObjectTag]


def _root(config: str) -> ET.Element:
    if "<!DOCTYPE" in config or "<!ENTITY" in config:
        raise LabelConfigError("label config must not contain DOCTYPE or ENTITY declarations")
    try:
        return ET.fromstring(config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None


def parse_tags(config: str | None) -> LabelConfigTags:
    """Control tags (they have `name` and `toName`) and object tags (`name` and `value`)."""
    controls: dict[str, ControlTag] = {}
    objects: dict[str, ObjectTag] = {}
    if not config or not config.strip():
        return LabelConfigTags(controls, objects)
    root = _root(config)
    parents = {child: parent for parent in root.iter() for child in parent}
    for tag in root.iter():
        attrs = dict(tag.attrib)
        name = attrs.get("name")
        if name and attrs.get("toName"):
            to_name = [n.strip() for n in attrs["toName"].split(",") if n.strip()]
            controls[name] = ControlTag(name, tag.tag, to_name, attrs)
        elif name and attrs.get("value"):
            objects[name] = ObjectTag(name, tag.tag, attrs["value"].lstrip("$"), attrs)
        if tag.tag in _LABEL_TAGS:
            owner = _owning_control(tag, parents, controls)
            value = attrs.get("alias") or attrs.get("value")
            if owner is not None and value:
                owner.labels[value] = attrs
    return LabelConfigTags(controls, objects)


def _owning_control(tag, parents, controls) -> ControlTag | None:
    node = parents.get(tag)
    while node is not None:
        name = node.attrib.get("name")
        if name in controls and node.attrib.get("toName"):
            return controls[name]
        node = parents.get(node)
    return None


def parse_config(config: str | None) -> dict:
    """Label Studio's `parse_config` shape, keyed by control tag name."""
    tags = parse_tags(config)
    parsed = {}
    for name, control in tags.controls.items():
        info: dict = {"type": control.type, "to_name": list(control.to_name)}
        conditionals = _conditionals(control.attrs)
        if conditionals:
            info["conditionals"] = conditionals
        info["inputs"] = [
            {"type": tags.objects[obj].type, "value": tags.objects[obj].value}
            for obj in control.to_name
            if obj in tags.objects
        ]
        info["labels"] = list(control.labels)
        info["labels_attrs"] = dict(control.labels)
        parsed[name] = info
    return parsed


def _conditionals(attrs: dict[str, str]) -> dict:
    if attrs.get("perRegion") != "true":
        return {}
    for attr, kind in (("whenTagName", "tag"), ("whenLabelValue", "label"), ("whenChoiceValue", "choice")):
        if attrs.get(attr):
            return {"type": kind, "name": attrs[attr]}
    return {}


def first_tag_occurrence(config, control_type, object_type, name_filter=None, to_name_filter=None):
    """(from_name, to_name, value) of the first control of `control_type` bound to an
    object of `object_type`; types are matched case-insensitively, either may be a tuple."""
    control_types = _lower_set(control_type)
    object_types = _lower_set(object_type)
    tags = parse_tags(config)
    for name, control in tags.controls.items():
        if control.type.lower() not in control_types:
            continue
        if name_filter is not None and not name_filter(name):
            continue
        for to_name in control.to_name:
            obj = tags.objects.get(to_name)
            if obj is None or obj.type.lower() not in object_types:
                continue
            if to_name_filter is not None and not to_name_filter(to_name):
                continue
            return name, to_name, obj.value
    raise LabelConfigError(
        f"label config has no {'/'.join(sorted(control_types))} control tag "
        f"bound to a {'/'.join(sorted(object_types))} object tag"
    )


def _lower_set(value) -> set[str]:
    if isinstance(value, str):
        return {value.lower()}
    return {v.lower() for v in value}
