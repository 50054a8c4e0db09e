"""`python -m sandbox run`: the world's process without the axiom command around it.

`axiom up` starts the world this way so that its process imports the sandbox, models and
config only — never the relay, whose library patches must not reach the receivers that
verify the relay's mail (`axiom sandbox run` works too, with the whole CLI imported).
"""

from sandbox.cli import sandbox_app

sandbox_app(prog_name="axiom sandbox")
