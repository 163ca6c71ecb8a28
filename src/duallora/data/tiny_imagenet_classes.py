"""The fixed split of Tiny-ImageNet's 200 classes into a pre-training half and a continual half.

Rule (applied once, then frozen as the explicit lists below): sort the 200 WordNet ids of
``wnids.txt``; those at even positions (0, 2, ..., 198) form the **pre-training half**, those at odd
positions the **continual half**. WordNet ids are ordered by their place in the WordNet hierarchy,
so neighbouring ids are related concepts (two dog breeds, two beetles): alternating puts related but
distinct classes on both sides, as ImageNet pre-training and the field's downstream benchmarks relate
(a backbone pre-trained on goldfish, tabby cats and German shepherds learns salamanders, Persian cats
and Labrador retrievers). Each half has 100 classes; they are disjoint. The comment after each id is
the first name in ``words.txt``. Used by ``data.classes=tiny-imagenet-pretrain`` /
``tiny-imagenet-continual`` and by the shipped natural-image backbone (docs/pretraining.md).
"""

PRETRAIN_WNIDS = (
    "n01443537",  # goldfish
    "n01641577",  # bullfrog
    "n01698640",  # American alligator
    "n01768244",  # trilobite
    "n01774384",  # black widow
    "n01784675",  # centipede
    "n01882714",  # koala
    "n01917289",  # brain coral
    "n01945685",  # slug
    "n01983481",  # American lobster
    "n02002724",  # black stork
    "n02058221",  # albatross
    "n02085620",  # Chihuahua
    "n02099601",  # golden retriever
    "n02106662",  # German shepherd
    "n02123045",  # tabby
    "n02124075",  # Egyptian cat
    "n02129165",  # lion
    "n02165456",  # ladybug
    "n02206856",  # bee
    "n02231487",  # walking stick
    "n02236044",  # mantis
    "n02279972",  # monarch
    "n02321529",  # sea cucumber
    "n02395406",  # hog
    "n02410509",  # bison
    "n02423022",  # gazelle
    "n02480495",  # orangutan
    "n02486410",  # baboon
    "n02509815",  # lesser panda
    "n02669723",  # academic gown
    "n02730930",  # apron
    "n02788148",  # bannister
    "n02793495",  # barn
    "n02802426",  # basketball
    "n02814533",  # beach wagon
    "n02815834",  # beaker
    "n02837789",  # bikini
    "n02843684",  # birdhouse
    "n02892201",  # brass
    "n02909870",  # bucket
    "n02927161",  # butcher shop
    "n02950826",  # cannon
    "n02977058",  # cash machine
    "n02999410",  # chain
    "n03026506",  # Christmas stocking
    "n03085013",  # computer keyboard
    "n03100240",  # convertible
    "n03160309",  # dam
    "n03201208",  # dining table
    "n03255030",  # dumbbell
    "n03388043",  # fountain
    "n03400231",  # frying pan
    "n03424325",  # gasmask
    "n03447447",  # gondola
    "n03584254",  # iPod
    "n03617480",  # kimono
    "n03649909",  # lawn mower
    "n03670208",  # limousine
    "n03733131",  # maypole
    "n03770439",  # miniskirt
    "n03804744",  # nail
    "n03837869",  # obelisk
    "n03854065",  # organ
    "n03902125",  # pay-phone
    "n03937543",  # pill bottle
    "n03976657",  # pole
    "n03980874",  # poncho
    "n03992509",  # potter's wheel
    "n04023962",  # punching bag
    "n04070727",  # refrigerator
    "n04099969",  # rocking chair
    "n04133789",  # sandal
    "n04149813",  # scoreboard
    "n04251144",  # snorkel
    "n04259630",  # sombrero
    "n04275548",  # spider web
    "n04311004",  # steel arch bridge
    "n04356056",  # sunglasses
    "n04371430",  # swimming trunks
    "n04398044",  # teapot
    "n04417672",  # thatch
    "n04465501",  # tractor
    "n04487081",  # trolleybus
    "n04507155",  # umbrella
    "n04532670",  # viaduct
    "n04560804",  # water jug
    "n04596742",  # wok
    "n06596364",  # comic book
    "n07583066",  # guacamole
    "n07615774",  # ice lolly
    "n07711569",  # mashed potato
    "n07720875",  # bell pepper
    "n07747607",  # orange
    "n07753592",  # banana
    "n07871810",  # meat loaf
    "n07875152",  # potpie
    "n09193705",  # alp
    "n09256479",  # coral reef
    "n09428293",  # seashore
)

CONTINUAL_WNIDS = (
    "n01629819",  # European fire salamander
    "n01644900",  # tailed frog
    "n01742172",  # boa constrictor
    "n01770393",  # scorpion
    "n01774750",  # tarantula
    "n01855672",  # goose
    "n01910747",  # jellyfish
    "n01944390",  # snail
    "n01950731",  # sea slug
    "n01984695",  # spiny lobster
    "n02056570",  # king penguin
    "n02074367",  # dugong
    "n02094433",  # Yorkshire terrier
    "n02099712",  # Labrador retriever
    "n02113799",  # standard poodle
    "n02123394",  # Persian cat
    "n02125311",  # cougar
    "n02132136",  # brown bear
    "n02190166",  # fly
    "n02226429",  # grasshopper
    "n02233338",  # cockroach
    "n02268443",  # dragonfly
    "n02281406",  # sulphur butterfly
    "n02364673",  # guinea pig
    "n02403003",  # ox
    "n02415577",  # bighorn
    "n02437312",  # Arabian camel
    "n02481823",  # chimpanzee
    "n02504458",  # African elephant
    "n02666196",  # abacus
    "n02699494",  # altar
    "n02769748",  # backpack
    "n02791270",  # barbershop
    "n02795169",  # barrel
    "n02808440",  # bathtub
    "n02814860",  # beacon
    "n02823428",  # beer bottle
    "n02841315",  # binoculars
    "n02883205",  # bow tie
    "n02906734",  # broom
    "n02917067",  # bullet train
    "n02948072",  # candle
    "n02963159",  # cardigan
    "n02988304",  # CD player
    "n03014705",  # chest
    "n03042490",  # cliff dwelling
    "n03089624",  # confectionery
    "n03126707",  # crane
    "n03179701",  # desk
    "n03250847",  # drumstick
    "n03355925",  # flagpole
    "n03393912",  # freight car
    "n03404251",  # fur coat
    "n03444034",  # go-kart
    "n03544143",  # hourglass
    "n03599486",  # jinrikisha
    "n03637318",  # lampshade
    "n03662601",  # lifeboat
    "n03706229",  # magnetic compass
    "n03763968",  # military uniform
    "n03796401",  # moving van
    "n03814639",  # neck brace
    "n03838899",  # oboe
    "n03891332",  # parking meter
    "n03930313",  # picket fence
    "n03970156",  # plunger
    "n03977966",  # police van
    "n03983396",  # pop bottle
    "n04008634",  # projectile
    "n04067472",  # reel
    "n04074963",  # remote control
    "n04118538",  # rugby ball
    "n04146614",  # school bus
    "n04179913",  # sewing machine
    "n04254777",  # sock
    "n04265275",  # space heater
    "n04285008",  # sports car
    "n04328186",  # stopwatch
    "n04366367",  # suspension bridge
    "n04376876",  # syringe
    "n04399382",  # teddy
    "n04456115",  # torch
    "n04486054",  # triumphal arch
    "n04501370",  # turnstile
    "n04532106",  # vestment
    "n04540053",  # volleyball
    "n04562935",  # water tower
    "n04597913",  # wooden spoon
    "n07579787",  # plate
    "n07614500",  # ice cream
    "n07695742",  # pretzel
    "n07715103",  # cauliflower
    "n07734744",  # mushroom
    "n07749582",  # lemon
    "n07768694",  # pomegranate
    "n07873807",  # pizza
    "n07920052",  # espresso
    "n09246464",  # cliff
    "n09332890",  # lakeside
    "n12267677",  # acorn
)
