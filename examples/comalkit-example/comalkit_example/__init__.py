"""An example comalkit plugin package (see docs/writing-a-plugin.md).

It adds ``solver=cdpo`` (:mod:`.solver`), ``oracle=noisy`` (:mod:`.oracle`),
``reference=growing`` (:mod:`.reference`) and, through the Hydra SearchPathPlugin in
``hydra_plugins/comalkit_example_searchpath``, the YAML preset ``experiment=example_preset``
(``conf/experiment/``). It uses only comalkit's public API: ``comalkit.registry`` to register,
``comalkit.interfaces`` for the contracts, ``comalkit.testing`` in its tests.
"""
