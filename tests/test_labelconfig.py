import pytest

from lsdeploy.labelconfig import LabelConfigError, first_tag_occurrence, parse_config, parse_tags

NER = """<View>
  <Labels name="label" toName="text">
    <Label value="PER" background="red"/>
    <Label value="ORG" alias="organization"/>
  </Labels>
  <Text name="text" value="$text"/>
  <View>
    <Choices name="quality" toName="text,image" perRegion="true" whenLabelValue="PER">
      <Choice value="good"/><Choice value="bad"/>
    </Choices>
  </View>
  <Image name="image" value="$image_url"/>
  <Rating name="stars" toName="text" maxRating="10"/>
</View>"""


def test_parse_config_has_label_studio_shape():
    parsed = parse_config(NER)
    assert parsed["label"] == {
        "type": "Labels",
        "to_name": ["text"],
        "inputs": [{"type": "Text", "value": "text"}],
        "labels": ["PER", "organization"],
        "labels_attrs": {
            "PER": {"value": "PER", "background": "red"},
            "organization": {"value": "ORG", "alias": "organization"},
        },
    }
    assert parsed["quality"]["to_name"] == ["text", "image"]
    assert parsed["quality"]["inputs"] == [{"type": "Text", "value": "text"}, {"type": "Image", "value": "image_url"}]
    assert parsed["quality"]["conditionals"] == {"type": "label", "name": "PER"}
    assert parsed["stars"]["labels"] == [] and parsed["stars"]["type"] == "Rating"


def test_parse_tags_keeps_attributes():
    tags = parse_tags(NER)
    assert tags.controls["stars"].attrs["maxRating"] == "10"
    assert tags.objects["image"].value == "image_url"
    assert set(tags.controls["quality"].labels) == {"good", "bad"}


def test_empty_and_broken_configs():
    assert parse_config(None) == {} and parse_config("  ") == {}
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_config("<View><Text name='t' value='$t'></View>")
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_config('<!DOCTYPE x [<!ENTITY a "aaaa">]><View>&a;</View>')


def test_first_tag_occurrence():
    assert first_tag_occurrence(NER, "Choices", ("Image", "Text")) == ("quality", "text", "text")
    assert first_tag_occurrence(NER, "labels", "text") == ("label", "text", "text")
    assert first_tag_occurrence(NER, "Choices", "Image") == ("quality", "image", "image_url")
    with pytest.raises(ValueError, match="no rectanglelabels control"):
        first_tag_occurrence(NER, "RectangleLabels", "Image")
