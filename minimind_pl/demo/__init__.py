"""``python main.py demo``: the embedded bilingual synthetic world (:mod:`~minimind_pl.demo.corpus`) and the
command that trains every stage on it through the shipped configs (:mod:`~minimind_pl.demo.command`)."""
