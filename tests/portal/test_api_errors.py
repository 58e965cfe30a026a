"""Every API error is one readable sentence, however deep REST framework nests it."""

from rest_framework.exceptions import ErrorDetail

from portal.api import error_lines


def test_a_field_error_names_the_field():
    assert error_lines({"sha256": [ErrorDetail("must be 64 hexadecimal digits.")]}) == [
        "sha256: must be 64 hexadecimal digits."
    ]


def test_an_error_inside_a_list_item_names_its_place():
    errors = {"acks": [{}, {"sha256": [ErrorDetail("must be 64 hexadecimal digits.")]}]}

    assert error_lines(errors) == ["acks.1.sha256: must be 64 hexadecimal digits."]


def test_errors_keyed_by_index_and_non_field_errors_read_plainly():
    errors = {
        "roles": {4: [ErrorDetail("Null characters are not allowed.")]},
        "acks": {"non_field_errors": [ErrorDetail("Ensure this field has at least 1 elements.")]},
    }

    assert error_lines(errors) == [
        "roles.4: Null characters are not allowed.",
        "acks: Ensure this field has at least 1 elements.",
    ]


def test_the_batch_ack_answers_a_bad_item_with_a_sentence(agents):
    response = agents["partner"].ack_many([(1, "not-a-checksum")])

    assert response.status_code == 400
    assert response.json() == {"error": "acks.0.sha256: must be 64 hexadecimal digits."}
