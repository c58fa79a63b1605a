from tools.gen_protos import stale_stubs


def test_generated_stubs_are_up_to_date():
    assert stale_stubs() == [], "regenerate with: python -m tools.gen_protos"
