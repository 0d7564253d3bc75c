"""The embedded demo model: procedural shapes dataset, pixel checker and the one-command rebuild."""
