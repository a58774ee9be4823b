"""Built-in preference oracles; their judge templates (``templates/*.txt``) load by name."""

from pathlib import Path

from comalkit.judge_prompt import register_template_dir

register_template_dir(Path(__file__).parent / "templates")
