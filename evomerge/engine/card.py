"""Model cards: a merged model says how it was made."""
from __future__ import annotations

from evomerge.engine.recipe import Recipe


def model_card(recipe: Recipe, *, title: str = "Merged model", sections: str = "") -> str:
    """A Hugging Face model card whose YAML header tags the merge and whose body embeds the recipe.

    ``sections`` is extra markdown (search and test scores, when the model is a search winner).
    """
    bases = [recipe.base_model] if recipe.base_model else []
    models = [m for m in recipe.all_model_refs() if m not in bases]
    header = ["---", "library_name: transformers", "tags:", "- merge", "- evomerge", "- mergekit"]
    if bases:
        header += ["base_model:", *[f"- {b}" for b in bases]]
    header.append("---")
    body = [
        f"# {title}",
        "",
        f"Built with evomerge using the **{recipe.merge_method}** merge method.",
        "",
        "## Models",
        *([f"- base: `{b}`" for b in bases] + [f"- `{m}`" for m in models]),
        "",
    ]
    if sections:
        body += [sections.rstrip(), ""]
    body += [
        "## Recipe",
        "",
        "This recipe replays with `evomerge-merge mergekit_config.yml OUT` or `mergekit-yaml mergekit_config.yml OUT`:",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(header + [""] + body)
