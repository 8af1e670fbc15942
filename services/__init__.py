"""Deployable services of the mesh; each is a thin servicer over plain classes in scalellm/."""
