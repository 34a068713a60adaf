"""Fleet side of the device-cloud link: keys, bundles, repository, deploy and commands."""
