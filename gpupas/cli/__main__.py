from gpupas.cli import main

if __name__ == "__main__":  # (not when a worker process of a local Dask cluster imports it)
    main()
