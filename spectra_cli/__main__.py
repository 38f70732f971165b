from spectra_cli.cli.app import main

main()
