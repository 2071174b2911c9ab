"""The patch registry (ears_vllm.seam.patches): the original kept, a second patch refused, every patch listed."""

from __future__ import annotations

from ears_vllm.seam import patches


class Target:
    def greet(self) -> str:
        return "vLLM"


def test_a_patch_keeps_the_original_and_a_second_patch_of_the_same_attribute_changes_nothing():
    original = Target.greet

    def wrap(greet):
        return lambda self: f"ears-vllm around {greet(self)}"

    first = patches.apply(Target, "greet", wrap, "test")
    second = patches.apply(Target, "greet", wrap, "test again")
    assert second is first and Target().greet() == "ears-vllm around vLLM"  # not wrapped twice
    assert patches.original(Target, "greet") is original and patches.is_patched(Target, "greet")
    assert f"{__name__}.Target.greet: test" in patches.describe()

    Target.greet = original  # undone from outside (a test's monkeypatch): the next apply patches again
    assert not patches.is_patched(Target, "greet")
    assert patches.apply(Target, "greet", wrap, "test").replacement is Target.greet
    Target.greet = original
