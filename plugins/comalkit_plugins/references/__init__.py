"""Reference updaters: how the reference policy μ moves between subgames."""
