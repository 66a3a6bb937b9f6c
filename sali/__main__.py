from sali.cli import main

main()
