from gpupas.cli import main

main()
