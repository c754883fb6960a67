"""seedselect: SeedSelect (Samuel et al., AAAI 2024) as a command-line tool.

Finds, by gradient descent through a frozen Stable Diffusion sampler, starting noises (seeds) from
which the model draws a rare concept shown in a few reference images.
"""

__version__ = "0.1.0"
