"""What a /predict answer must satisfy: the rule ids (RULES), the severities, and which result
types and value keys each control tag produces."""
ERROR = "error"
WARNING = "warning"

# rule id -> what it requires (docs/preview.md lists the same table)
RULES = {
    "response": "the /predict body is a JSON object with a `results` list",
    "count": "one prediction per task, in task order: no task without one, none naming another task",
    "prediction": "each prediction is an object with a `result` list",
    "model-version": "each prediction has a non-empty `model_version`",
    "score": "`score` (per prediction and per region) is a number when present",
    "region": "each result item is an object with from_name, to_name, type and an object `value`",
    "from-name": "`from_name` is the name of a control tag in the label config",
    "to-name": "`to_name` is one of that control tag's object tags (its toName)",
    "type": "`type` is the control tag's name in lower case (Choices -> choices)",
    "choices": "choices are defined in the config; one only unless choice=\"multiple\"",
    "labels": "labels of a region are defined in the control tag",
    "rating": "rating is a whole number within 1..maxRating (default 5)",
    "number": "number is a number within the tag's min..max",
    "textarea": "textarea `text` is a string or a list of strings",
    "taxonomy": "taxonomy is a list of paths whose items are defined in the config",
    "datetime": "datetime is a string",
    "pairwise": "pairwise `selected` is \"left\" or \"right\"",
    "region-field": "region fields are present with the right types (start/end, x/y/width/height, points, ...)",
    "region-range": "regions lie inside their object: spans inside the text, image regions within 0..100 %",
    "region-text": "a span's `text` equals the task text between start and end",
    "relation": "a relation joins two region ids of the same result, with labels from <Relations>",
}

# Control tags whose regions carry labels, and the value key that holds them.
LABEL_KEYS = {
    "labels": "labels",
    "rectanglelabels": "rectanglelabels",
    "polygonlabels": "polygonlabels",
    "ellipselabels": "ellipselabels",
    "keypointlabels": "keypointlabels",
    "brushlabels": "brushlabels",
    "hypertextlabels": "hypertextlabels",  # older editors wrote "htmllabels"
    "paragraphlabels": "paragraphlabels",
    "timeserieslabels": "timeserieslabels",
    "timelinelabels": "timelinelabels",
    "vectorlabels": "vectorlabels",
}
IMAGE_OBJECTS = {"image"}
# Result types a plain <Labels> tag produces on an image (with a shape tool) or a video.
_LABELS_ON_IMAGE = {"labels", "rectanglelabels", "polygonlabels", "ellipselabels", "keypointlabels", "brushlabels"}
_LABELS_ON_VIDEO = {"labels", "videorectangle"}
# Controls whose values this module checks; any other control gets from_name/to_name/type only.
KNOWN_CONTROLS = set(LABEL_KEYS) | {
    "choices", "rectangle", "polygon", "ellipse", "keypoint", "brush", "textarea", "rating",
    "number", "datetime", "taxonomy", "videorectangle", "pairwise",
}
_EPS = 1e-4  # floating-point slack for x + width <= 100
