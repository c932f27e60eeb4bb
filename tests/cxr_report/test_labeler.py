"""The rule labeler on hand-written report sentences with known labels (1 positive, 0 negative, -1 uncertain)."""
from __future__ import annotations

import pytest

from nbsupport.cxr_report.labeler import LABELS, label_report, positive_matrix

# (sentence, {label: expected value}); labels not listed must be None (not mentioned), except "No Finding", which
# is checked only where listed.
CASES = [
    ("There is cardiomegaly.", {"Cardiomegaly": 1}),
    ("The heart is enlarged.", {"Cardiomegaly": 1}),
    ("Moderate enlargement of the cardiac silhouette.", {"Cardiomegaly": 1}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("No cardiomegaly.", {"Cardiomegaly": 0}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("Possible mild cardiomegaly.", {"Cardiomegaly": -1}),
    ("Small left pleural effusion.", {"Pleural Effusion": 1}),
    ("There are bilateral pleural effusions.", {"Pleural Effusion": 1}),
    ("No pleural effusion.", {"Pleural Effusion": 0}),
    ("There is no effusion.", {"Pleural Effusion": 0}),
    ("No effusion is seen.", {"Pleural Effusion": 0}),
    ("Blunting of the left costophrenic angle.", {"Pleural Effusion": 1}),
    ("Small pericardial effusion.", {}),
    ("A small right effusion cannot be excluded.", {"Pleural Effusion": -1}),
    ("There is a right apical pneumothorax.", {"Pneumothorax": 1}),
    ("No pneumothorax.", {"Pneumothorax": 0}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": 0}),
    ("Questionable small left pneumothorax.", {"Pneumothorax": -1}),
    ("Focal right lower lobe consolidation.", {"Consolidation": 1}),
    ("No focal consolidation.", {"Consolidation": 0}),
    ("Consolidation concerning for pneumonia.", {"Consolidation": 1, "Pneumonia": -1}),
    ("Findings may represent pneumonia.", {"Pneumonia": -1}),
    ("There is a 1 cm pulmonary nodule.", {"Lung Lesion": 1}),
    ("Multiple pulmonary nodules are present.", {"Lung Lesion": 1}),
    ("No suspicious mass.", {"Lung Lesion": 0}),
    ("Patchy opacity at the left base.", {"Lung Opacity": 1}),
    ("Bibasilar opacities likely atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("Mild pulmonary edema.", {"Edema": 1}),
    ("No pulmonary edema.", {"Edema": 0}),
    ("Bibasilar atelectasis.", {"Atelectasis": 1}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": 1}),
    ("The mediastinum is not widened.", {"Enlarged Cardiomediastinum": 0}),
    ("Normal cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": 0}),
    ("Left pleural thickening.", {"Pleural Other": 1}),
    ("Healed left rib fracture.", {"Fracture": 1}),
    ("No acute fracture.", {"Fracture": 0}),
    ("An endotracheal tube is in place.", {"Support Devices": 1, "No Finding": 1}),
    ("Left chest wall pacemaker with leads in the heart.", {"Support Devices": 1}),
    ("Right internal jugular line with tip in the SVC.", {"Support Devices": 1}),
    ("No acute cardiopulmonary abnormality.", {"No Finding": 1}),
    ("No pneumothorax but there is a small left pleural effusion.",
     {"Pneumothorax": 0, "Pleural Effusion": 1, "No Finding": None}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("The lungs are clear without consolidation, effusion or pneumothorax.",
     {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("Cardiomegaly. No pleural effusion.", {"Cardiomegaly": 1, "Pleural Effusion": 0, "No Finding": None}),
    ("No pneumothorax. There is a small left pneumothorax.", {"Pneumothorax": 1}),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("sentence,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_sentence_labels(sentence: str, expected: dict) -> None:
    labels = label_report(sentence)
    assert set(labels) == set(LABELS)
    for label in LABELS:
        if label == "No Finding" and label not in expected:
            continue
        assert labels[label] == expected.get(label), (label, labels)


def test_no_finding_only_without_pathology() -> None:
    assert label_report("Support devices in place. Heart size is normal.")["No Finding"] == 1
    assert label_report("Possible small effusion.")["No Finding"] is None


def test_positive_matrix_counts_only_positives_unless_asked() -> None:
    labels = [label_report("Possible pneumonia. There is cardiomegaly. No effusion.")]
    matrix = positive_matrix(labels)
    assert matrix[0, LABELS.index("Cardiomegaly")] == 1
    assert matrix[0, LABELS.index("Pneumonia")] == 0
    assert matrix[0, LABELS.index("Pleural Effusion")] == 0
    assert positive_matrix(labels, uncertain_as=1)[0, LABELS.index("Pneumonia")] == 1
